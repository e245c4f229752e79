"""The suite's own rules under CI (``CI`` set, as ``.ci/run`` does): missing infrastructure
fails rather than skips, and the property tests draw the same examples every run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from team_server import import_or_skip_or_fail, skip_or_fail

TESTS = Path(__file__).resolve().parent


def test_missing_infrastructure_skips_outside_ci_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="^no PostgreSQL$"):
        skip_or_fail("no PostgreSQL")

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"^no PostgreSQL \(CI is set, so this is a failure, not a skip\)$"):
        skip_or_fail("no PostgreSQL")


def test_a_missing_optional_package_skips_its_module_outside_ci_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_package_for_taskvec is not importable .*: pip install it"):
        import_or_skip_or_fail("no_such_package_for_taskvec", "pip install it")
    assert import_or_skip_or_fail("json", "never needed").dumps([1]) == "[1]"

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no_such_package_for_taskvec is not importable .*\(CI is set, so this is a failure, not a skip\)$"):
        import_or_skip_or_fail("no_such_package_for_taskvec", "pip install it")


@pytest.mark.parametrize("ci, derandomized", [("true", True), (None, False)], ids=["ci", "local"])
def test_with_ci_set_the_property_tests_are_derandomized(ci, derandomized):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    code = "import conftest, test_properties as t; print(t.SETTINGS.derandomize, t.FILE_SETTINGS.derandomize)"

    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True, timeout=120, check=True)

    assert out.stdout.split() == [str(derandomized)] * 2


def test_every_skip_goes_through_the_skip_or_fail_rule():
    """A missing dependency or piece of infrastructure skips outside CI and fails in CI: no test
    calls pytest.skip or pytest.importorskip itself (team_server.py holds the one rule)."""
    import re

    pattern = re.compile(r"pytest\.(importorskip|skip)\(")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name != "team_server.py"
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if pattern.search(line) and "pattern = re.compile" not in line
    ]
    assert offenders == []
