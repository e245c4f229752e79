#!/usr/bin/env python
"""Start-up: a local ``compose`` of a tiny recipe against ``python -c "import torch"``.

Builds a base and a fine-tune of two tensors in a temporary folder, then runs, in interleaved
rounds, ``python -c "import torch"`` and ``mlflow-taskvec compose recipe.yaml -o out.safetensors
-q`` (as ``python -m mlflow_taskvec.cli``) in fresh interpreters, and prints the best and the
median wall time and CPU time (user + sys of the process, from ``wait4``) of each, and how far
the compose is above the import (and above an import that then freezes torch's objects, as the
CLI does: ``python -c "import gc, torch; gc.freeze()"``, whose exit is cheaper too). CPU time varies less than wall time on a shared machine.
``--other PATH`` adds the compose of another checkout of the package (run with
``PYTHONPATH=PATH``), measured in the same rounds. docs/benchmarks.md "Start-up".

    python benchmarks/bench_startup.py --rounds 5
    python benchmarks/bench_startup.py --rounds 7 --other /tmp/before   # e.g. `git archive` of a commit
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_recipe(folder: Path) -> None:
    """A base, a fine-tune and a recipe of one task vector in ``folder`` (what the start-up test composes too)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
    save_file(base, str(folder / "base.safetensors"))
    save_file({k: v + 0.1 for k, v in base.items()}, str(folder / "ft.safetensors"))
    (folder / "recipe.yaml").write_text("base: base.safetensors\nscale: 0.5\nvectors:\n  - {finetuned: ft.safetensors}\n")


def _run(argv: list[str], cwd: Path, pythonpath: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys) of one run of ``argv``."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{' '.join(argv)} failed (status {status})")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--other", default=None, help="another checkout's root: its compose is measured too")
    args = parser.parse_args()
    compose = [sys.executable, "-m", "mlflow_taskvec.cli", "compose", "recipe.yaml", "-o", "out.safetensors", "-q", "--overwrite"]
    runs = {
        "import torch": ([sys.executable, "-c", "import torch"], str(ROOT)),
        # what the CLI does first (cli._import_torch_first): the exit then skips collecting torch's objects too
        "torch + freeze": ([sys.executable, "-c", "import gc, torch; gc.freeze()"], str(ROOT)),
        "compose": (compose, str(ROOT)),
    }
    if args.other:
        runs["compose (other)"] = (compose, str(Path(args.other).resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tiny_recipe(folder)
        for argv, path in runs.values():  # warm the page cache and the bytecode once
            _run(argv, folder, path)
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
        loads = []
        for _ in range(args.rounds):
            for label, (argv, path) in runs.items():
                times[label].append(_run(argv, folder, path))
            loads.append(os.getloadavg()[0])
    best = {label: (min(w for w, _ in t), min(c for _, c in t)) for label, t in times.items()}
    for label, t in times.items():
        print(
            f"{label:16s} wall best {best[label][0]:.3f} s, median {statistics.median(w for w, _ in t):.3f} s; "
            f"CPU best {best[label][1]:.3f} s, median {statistics.median(c for _, c in t):.3f} s"
        )
    for label in runs:
        if label.startswith("compose"):
            for floor in ("import torch", "torch + freeze"):
                print(f"{label}: {best[label][0] - best[floor][0]:+.3f} s wall, {best[label][1] - best[floor][1]:+.3f} s CPU above {floor}")
    print(f"best of {args.rounds}; 1-minute load average during the rounds {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
