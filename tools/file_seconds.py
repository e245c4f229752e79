"""Each test file's seconds in a pytest JUnit report, beside what the file declares.

    .venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --junitxml=/tmp/tests.xml
    .venv/bin/python tools/file_seconds.py /tmp/tests.xml

Files declaring ``pytestmark = pytest.mark.seconds(N)`` go out first under ``make test``
(tests/conftest.py), so that the two workers end together; this prints every file of 15 s or
more, its measured seconds (setup, call and teardown of its tests) and its declared figure,
marking those that are off by more than half.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
SHOWN_FROM = 15.0


def declared(module: str) -> float | None:
    found = re.search(r"^pytestmark = pytest\.mark\.seconds\((\d+)\)", (TESTS / f"{module}.py").read_text("utf-8"), re.MULTILINE)
    return float(found.group(1)) if found else None


def main(report: str) -> None:
    seconds: Counter[str] = Counter()
    for case in ET.parse(report).iter("testcase"):
        seconds[case.get("classname").removeprefix("tests.")] += float(case.get("time"))
    print(f"{sum(seconds.values()):.0f} s in all")
    for module, measured in seconds.most_common():
        wanted = declared(module)
        if measured < SHOWN_FROM and wanted is None:
            continue
        off = wanted is None or not 0.5 <= measured / wanted <= 1.5
        print(f"{measured:7.1f}  {module:<28} declared {wanted if wanted is not None else '-'!s:>5}{'  <- update' if off else ''}")


if __name__ == "__main__":
    main(*sys.argv[1:])
