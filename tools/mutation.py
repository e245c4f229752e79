"""Mutation testing with mutmut, one module (or family of modules) at a time: `make mutation`.

Each target names the files mutmut mutates and the test files that exercise them (and the
slow tests left out). For every target this script lays out a folder
`mutation-out/<target>/` (links to the package and the tests, plus a `pyproject.toml` with
that target's `[tool.mutmut]` table), runs `mutmut run` there under `nice`, and writes
`mutation-out/<target>/survivors.txt` (the diff of every surviving mutant) and one summary
line per target to `mutation-out/summary.tsv`. mutmut then runs, for each mutant, only the
selected tests that called the mutated function (its stats run records which), stopping at
the first failure. Hypothesis runs under the `ci` profile (derandomized), so the selection
and the verdicts repeat run after run.

    python tools/mutation.py                     # every target, one after another
    python tools/mutation.py lora                # one target
    python tools/mutation.py lora --mutants 'mlflow_taskvec.engine.lora.x_read_adapter*'

Not part of `make test`; the counts are in docs/mutation.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "mutation-out"


@dataclass(frozen=True)
class Target:
    mutate: tuple[str, ...]  # globs of files mutmut mutates (relative to the repository)
    tests: tuple[str, ...]  # the test files that exercise them
    keyword: str = ""  # a pytest -k expression: the slow tests left out
    copy: tuple[str, ...] = field(default=())  # folders besides tests/ the tests read


# Slow tests left out: the "larger than a chunk" rows repeat the small rows on tensors of a
# few million entries (the streaming machinery, not the formulas, is what they add).
LARGE = "not larger_than_a_chunk and not large_tensor and not more_than_a_random_block"

TARGETS: dict[str, Target] = {
    "methods": Target(
        mutate=("mlflow_taskvec/engine/methods/*.py",),
        tests=("tests/test_methods.py", "tests/test_methods_sota.py", "tests/test_specifications.py", "tests/test_mutants_methods.py"),
        keyword=LARGE,
    ),
    "compressed": Target(
        mutate=("mlflow_taskvec/engine/compressed.py",),
        tests=("tests/test_compressed.py", "tests/test_layouts.py", "tests/test_mutants_layouts.py"),
        keyword="not large_tensors_densify",
    ),
    "lowrank": Target(
        mutate=("mlflow_taskvec/engine/lowrank.py",),
        tests=("tests/test_layouts.py", "tests/test_compressed.py", "tests/test_mutants_layouts.py"),
        keyword="not large_tensors_densify",
    ),
    "lora": Target(
        mutate=("mlflow_taskvec/engine/lora.py",),
        tests=("tests/test_lora.py", "tests/test_mutants_layouts.py", "tests/test_mutants_lora.py"),
        # the six slowest (PEFT models loaded and run, the CLI round trip): 5-7 s each per mutant
        keyword="not (cli_extracts or get_delta_weight or chunks_of_a_low_rank or by_energy_sets or composes_exactly or loads_in_peft)",
    ),
    "adamerging": Target(
        mutate=("mlflow_taskvec/mlflow/adamerging.py",),
        tests=("tests/test_adamerging.py", "tests/test_mutants_adamerging.py"),
        # the tests that need no MLflow store: the others train and register the digits
        # example (30 s of setup each time), which no mutant run can afford
        keyword="layer_groups_follow or mean_shannon_entropy or batch_size_splits or weights_carry or mutants_adamerging",
        copy=("examples",),
    ),
}


# What a run on the project's 2-core machine covers in its time (`--subset`): per target, the
# functions that carry a documented promise (a formula of docs/methods.md, the layouts'
# read-back and checks, AdaMerging's options). docs/mutation.md gives the counts.
def _in(module: str, *functions: str) -> tuple[str, ...]:
    return tuple(f"mlflow_taskvec.{module}.{f}__mutmut_*" for f in functions)


SUBSETS: dict[str, tuple[str, ...]] = {
    "methods": _in("engine.methods.linear", "x*")
    + _in("engine.methods.ties", "x*")
    + _in("engine.methods.dare", "x*")
    + _in("engine.methods.consensus", "x*")
    + _in("engine.methods.slerp", "x*")
    + _in("engine.methods.tsv", "x*")
    + _in("engine.methods.spectral", "x*")
    + _in("engine.methods.isotropic", "x*")
    + _in("engine.methods.della", "x_rank_norm", "x_keep_probabilities", "x_check_probabilities")
    + _in("engine.methods.della", "x_della_merge")
    + _in("engine.methods.trim", "x*")
    + _in("engine.methods.breadcrumbs", "x*"),
    "compressed": _in("engine.compressed", "xǁCompressedCheckpointǁ_sparse", "xǁCompressedCheckpointǁ_bitdelta",
                      "xǁCompressedCheckpointǁ_zero", "x__check_indices", "x_pack_signs", "x_unpack_signs",
                      "x_sparse_indices", "xǁ_Encoderǁplan"),
    "lowrank": _in("engine.lowrank", "x_rank_for_energy", "xǁLowRankTensorǁrows", "xǁLowRankTensorǁchunk",
                   "xǁDenseDeltaǁchunk", "xǁProductTensorǁchunk", "xǁLowRankCheckpointǁcheck_finite")
    + _in("engine.lowrank", "x_read_low_rank", "x_read_lora_layout", "x_save_low_rank"),
    "lora": _in("engine.lora", "xǁAdapterConfigǁrank_and_scaling", "x__pattern_key", "x_truncated_svd", "x_svd_factors",
                "x_adapter_config", "x_is_embedding_module")
    + _in("engine.lora", "x_open_adapter", "x_read_adapter_config", "x__export", "x_export_lora"),
    "adamerging": _in("mlflow.adamerging", "x_learn_coefficients", "x_layer_groups", "x__rows", "x_prediction_entropy",
                      "xǁLearnedǁweights", "x__globs_of", "xǁ_Batchesǁ*"),
}


def toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(str(v)) for v in values) + "]"


# mutmut stops a mutant's tests (a timeout, counted as killed) after (t + TIMEOUT_CONSTANT) *
# TIMEOUT_MULTIPLIER seconds of wall time, t the unmutated run's time of the tests it runs. Its
# default (15 x) lets a mutant that loops (della_merge's `range(0, step)`: a million empty blocks
# per tensor) hold a child for many minutes of a 2-core machine; 4 x still leaves room for load.
TIMEOUT_MULTIPLIER = 4.0
TIMEOUT_CONSTANT = 5.0


def lay_out(name: str, target: Target, fresh: bool, before: bool, timeout_multiplier: float = TIMEOUT_MULTIPLIER) -> Path:
    """The target's folder: links to the package, the tests and setup.cfg (pytest's settings), and its mutmut table."""
    work = OUT / name
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for link in ("mlflow_taskvec", "tests", "setup.cfg", *target.copy):
        if not (work / link).is_symlink():
            (work / link).symlink_to(ROOT / link)
    tests = [t for t in target.tests if (ROOT / t).exists() and not (before and Path(t).name.startswith("test_mutants_"))]
    selection = [*tests] + (["-k", target.keyword] if target.keyword else [])
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["mlflow_taskvec"]\n'
        f"only_mutate = {toml_list(target.mutate)}\n"
        f"also_copy = {toml_list(target.copy)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(selection)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:xdist", "--hypothesis-profile=ci", "-W", "ignore"]\n'
        "use_git_change_detection = false\n"
        f"timeout_multiplier = {timeout_multiplier}\n"
        f"timeout_constant = {TIMEOUT_CONSTANT}\n",
        "utf-8",
    )
    return work


# The diffs of many mutants in one process (`mutmut show` takes one, and seconds to start).
SHOW = """
import sys
from mutmut.__main__ import find_mutant, get_diff_for_mutant
for name in sys.stdin.read().split():
    print("#", name, "")
    print(get_diff_for_mutant(name, path=find_mutant(name).path))
    print()
"""


def diffs(work: Path, names: list[str], found: dict[str, str], nice: int) -> str:
    shown = mutmut(work, nice=nice, code=SHOW, stdin="\n".join(names)).stdout
    for name in names:
        shown = shown.replace(f"# {name} \n", f"# {name} ({found[name]})\n", 1)
    return shown


def mutmut(work: Path, *args: str, nice: int, log=None, code: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MLFLOW_TRACKING_URI="", PYTHONDONTWRITEBYTECODE="1")
    extra = os.environ.get("MUTMUT_PYTHONPATH")  # where mutmut lives, if not in the interpreter's environment
    if extra:
        env["PYTHONPATH"] = extra
    cmd = ["nice", "-n", str(nice), sys.executable, *(["-c", code] if code else ["-m", "mutmut", *args])]
    return subprocess.run(cmd, cwd=work, env=env, input=stdin, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def verdicts(work: Path, nice: int, patterns: list[str]) -> dict[str, str]:
    """mutmut's verdict of every mutant whose name matches one of ``patterns`` (all when none)."""
    listing = mutmut(work, "results", "--all", "true", nice=nice).stdout
    rows = [line.strip().rpartition(": ") for line in listing.splitlines() if line.startswith("    ")]
    return {key: status for key, _, status in rows if not patterns or any(fnmatch.fnmatchcase(key, p) for p in patterns)}


def run_target(name: str, mutants: list[str], fresh: bool, nice: int, children: int, before: bool, report_only: bool = False,
               timeout_multiplier: float = TIMEOUT_MULTIPLIER) -> dict:
    target = TARGETS[name]
    work = lay_out(name + ("-before" if before else ""), target, fresh, before, timeout_multiplier)
    start = time.monotonic()
    if not report_only:
        with open(work / "mutmut.log", "w") as log:
            mutmut(work, "run", "--max-children", str(children), *mutants, nice=nice, log=log)
    seconds = time.monotonic() - start
    found = verdicts(work, nice, mutants)
    alive = sorted(k for k, v in found.items() if v in ("survived", "no tests"))
    (work / "survivors.txt").write_text(diffs(work, alive, found, nice), "utf-8")
    tally = Counter(found.values())
    stats = dict(target=work.name, mutants=len(found), **{k: tally.get(k, 0) for k in STATUSES}, seconds=round(seconds),
                 subset=(" ".join(mutants) if len(mutants) <= 12 else f"{len(mutants)} named mutants") or "all")
    with open(OUT / "summary.tsv", "a", encoding="utf-8") as out:
        out.write(datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ") + "\t" + "\t".join(str(v) for v in stats.values()) + "\n")
    return stats


STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault", "not checked")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"{', '.join(TARGETS)} (default: every target)")
    parser.add_argument("--mutants", nargs="*", default=[], help="mutmut's mutant names or globs (a subset)")
    parser.add_argument("--subset", action="store_true", help="each target's documented subset (SUBSETS; docs/mutation.md)")
    parser.add_argument("--before", action="store_true", help="without tests/test_mutants_*.py, in mutation-out/<target>-before")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results of these targets")
    parser.add_argument("--after", action="store_true", help="only the mutants that the --before run left alive, with every test")
    parser.add_argument("--again", action="store_true", help="only the mutants that this target's last run left alive")
    parser.add_argument("--report-only", action="store_true", help="only count and list the results of an earlier run")
    parser.add_argument("--nice", type=int, default=15)
    parser.add_argument("--children", type=int, default=1, help="mutants tested at once")
    parser.add_argument("--timeout-multiplier", type=float, default=TIMEOUT_MULTIPLIER,
                        help="a mutant's tests are stopped (timeout) after (their unmutated time + %g s) times this" % TIMEOUT_CONSTANT)
    args = parser.parse_args()
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}: not one of {', '.join(TARGETS)}")
    OUT.mkdir(exist_ok=True)
    for name in args.targets or list(TARGETS):
        mutants = args.mutants or (list(SUBSETS.get(name, ())) if args.subset else [])
        if args.after:  # the mutants that the run without the new tests left alive
            before = verdicts(OUT / f"{name}-before", args.nice, mutants)
            mutants = sorted(k for k, v in before.items() if v in ("survived", "no tests"))
        if args.again:  # the mutants this target's last run left alive (after new tests)
            last = verdicts(OUT / name, args.nice, mutants)
            mutants = sorted(k for k, v in last.items() if v in ("survived", "no tests"))
        stats = run_target(name, mutants, args.fresh and not args.report_only, args.nice, args.children, args.before, args.report_only,
                           args.timeout_multiplier)
        print(f"{stats['target']}: {stats['mutants']} mutants, {stats['killed']} killed, {stats['survived']} survived, "
              f"{stats['no tests']} run by no test, {stats['timeout']} timed out, in {stats['seconds']} s "
              f"(mutation-out/{stats['target']}/survivors.txt)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
