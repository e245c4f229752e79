"""The docs run: every ``bash``/``sh``/``python`` block of README.md and docs/*.md is either
run here, in order, in a temporary folder of its page's own (with a real sqlite MLflow store
where the page makes one), or marked illustrative by ``<!-- illustrative -->`` on the line
before its fence (CONTRIBUTING.md, "Documentation"). Also: README.md stays short, every page is
in mkdocs.yml's nav, and CONTRIBUTING.md names every engine module."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# about 65 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(65)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
MARKER = "<!-- illustrative -->"
RUNNABLE = {"bash": "bash", "sh": "bash", "python": "python"}
FENCE = re.compile(r"^(`{3,})(.*)$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    illustrative: bool

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page (fences at the start of a line, as the docs write them)."""
    lines = page.read_text("utf-8").split("\n")
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == fence), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: a fence that is never closed"
        illustrative = i > 0 and lines[i - 1].strip() == MARKER
        found.append(Block(page, i + 1, language, "\n".join(lines[i + 1 : end]) + "\n", illustrative))
        i = end + 1
    return found


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language in RUNNABLE and not b.illustrative]


def test_every_block_names_its_language_and_every_marker_stands_before_a_block():
    for page in PAGES:
        for block in blocks(page):
            assert block.language, f"{block.where()}: a fence without a language (use text for output)"
        lines = page.read_text("utf-8").split("\n")
        for n, line in enumerate(lines[:-1]):
            if line.strip() == MARKER:
                assert FENCE.match(lines[n + 1]), f"{page.relative_to(ROOT)}:{n + 1}: {MARKER} not right before a fence"


def test_the_readme_is_short_and_its_quickstarts_are_run_here():
    assert len((ROOT / "README.md").read_text("utf-8").splitlines()) <= 200
    languages = [b.language for b in runnable(ROOT / "README.md")]
    assert languages.count("python") >= 3 and languages.count("bash") >= 2, languages


def test_every_page_is_in_the_nav_and_the_nav_names_only_pages():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text("utf-8"))

    def files(nav):
        for entry in nav:
            for value in entry.values():
                yield from (files(value) if isinstance(value, list) else [value])

    assert sorted(files(config["nav"])) == sorted(p.name for p in DOCS.glob("*.md"))


def test_contributing_names_every_engine_module():
    text = (ROOT / "CONTRIBUTING.md").read_text("utf-8")
    engine = ROOT / "mlflow_taskvec" / "engine"
    for module in sorted(engine.glob("*.py")) + sorted((engine / "methods").glob("*.py")):
        assert f"`engine/{module.relative_to(engine).as_posix()}`" in text, module.relative_to(ROOT)


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> None:
    if RUNNABLE[block.language] == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        command = [sys.executable, "-c", block.code]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.where()} ({block.language}) exited {done.returncode}:\n{block.code}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_blocks_of_a_page_run_in_order(page, tmp_path):
    todo = runnable(page)
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        MLFLOW_TASKVEC_CACHE=str(tmp_path / "cache"),
        HOME=str(tmp_path / "home"),
    )
    work = tmp_path / "work"
    work.mkdir()
    for block in todo:
        run_block(block, work, env)
