#!/usr/bin/env python
"""mlflow-taskvec against mergekit, side by side: the same checkpoints, the same merges.

Sets up mergekit (pinned: ``MERGEKIT``) in its own virtualenv under the work
folder, torch held to the project's CPU wheel by ``constraints.txt``; generates the
engine benchmark's checkpoints (a base and three fine-tunes, as HF folders with a
``config.json``): Llama-shaped fp32 single files of ``--size-gb``, and/or, per
``--shapes``, a real LLM's shape in bf16, HF-sharded (``bench_engine.LLM_SHAPES``);
and times, each as a whole process (start-up included) and best of ``--repeat``:

- ``mergekit-yaml config.yml OUT`` for each method, fine-tunes given as models;
- ``mlflow-taskvec compose recipe.yaml -o OUT``, the fine-tunes extracted on the fly.

Both merge ``base + 0.8 * method(0.5 t1, 0.3 t2, 0.7 t3)`` (``ties`` at density 0.2;
mergekit's ``normalize`` on for the methods with a sign election, as our divisor
sums the agreeing |w_i|), write the checkpoints' dtype (fp32, or bf16: mergekit's
``out_dtype``, our recipe's ``dtype``), and are compared by the largest absolute
difference of their outputs, in float32: task arithmetic should agree to float
rounding; ties differs where the two pick different entries among magnitudes tied
at the trim threshold; della draws its random masks differently. At bf16 mergekit
computes in ``--mergekit-dtype`` (default bfloat16, its usual setting for bf16
models; float32 computes as we do), ours always in float32.

    .venv/bin/python benchmarks/bench_peers.py --size-gb 0.5 --repeat 3 [--markdown]
    .venv/bin/python benchmarks/bench_peers.py --shapes tinyllama-1.1b --repeat 3 [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_engine  # noqa: E402

MERGEKIT = "mergekit==0.1.5"
WEIGHTS = (0.5, 0.3, 0.7)
SCALE = 0.8
DENSITY = 0.2
BREADCRUMBS = {"density": 0.9, "gamma": 0.01}
DELLA = {"density": 0.3, "epsilon": 0.1}
# method: (mergekit's merge_method, mergekit's per-model parameters, ours, our params), the same parameters both
# sides; mergekit's ``normalize`` on where there is a sign election (our disjoint mean divides by the agreeing weights)
METHODS = {
    "task_arithmetic": ("task_arithmetic", {}, "task_arithmetic", {}),
    "ties": ("ties", {"density": DENSITY}, "ties", {"density": DENSITY}),
    "breadcrumbs": ("breadcrumbs", BREADCRUMBS, "breadcrumbs", BREADCRUMBS),
    "breadcrumbs_ties": ("breadcrumbs_ties", BREADCRUMBS, "breadcrumbs_ties", BREADCRUMBS),
    "della": ("della", DELLA, "della", DELLA),
}
ELECTING = ("ties", "breadcrumbs_ties", "della")
TARGETS = {"task_arithmetic": 3.0, "ties": 8.0, "breadcrumbs_ties": 5.0, "della": 5.0}  # ours at least this many times faster


def setup_mergekit(work: Path) -> Path:
    """The ``mergekit-yaml`` of a virtualenv under ``work``, installed once."""
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    stamp = venv / ".installed"
    if exe.exists() and stamp.exists() and stamp.read_text() == MERGEKIT:
        return exe
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    print(f"installing {MERGEKIT} into {venv} (torch held by constraints.txt)")
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), MERGEKIT], check=True)
    stamp.write_text(MERGEKIT)
    return exe


def llama_folders(directory: Path, model: "float | str", seed: int) -> list[Path]:
    """The engine benchmark's checkpoints of ``model`` (a size in GB or an LLM shape) as HF folders
    (weights + config.json)."""
    return [bench_engine.hf_folder(f) for f in bench_engine.generate_model(directory, model, seed)]


def write_configs(work: Path, folders: list[Path], method: str, dtype: str, mergekit_dtype: str) -> tuple[Path, Path]:
    """mergekit's config and our recipe of ``method``, both writing ``dtype`` (mergekit computing in ``mergekit_dtype``)."""
    import yaml

    theirs, their_params, ours, our_params = METHODS[method]
    base, fts = folders[0], folders[1:]
    mergekit_config = {
        "merge_method": theirs,
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": w, **their_params}} for ft, w in zip(fts, WEIGHTS)],
        "parameters": {"lambda": SCALE, "normalize": method in ELECTING},
        "dtype": mergekit_dtype,
        "out_dtype": dtype,
    }
    recipe = {
        "base": str(base), "method": ours, "scale": SCALE, "params": our_params, "dtype": dtype,
        "vectors": [{"finetuned": str(ft), "weight": w} for ft, w in zip(fts, WEIGHTS)],
    }
    a, b = work / f"mergekit-{method}-{dtype}.yml", work / f"recipe-{method}-{dtype}.yaml"
    a.write_text(yaml.safe_dump(mergekit_config, sort_keys=False))
    b.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return a, b


def timed(cmd: list[str], out: Path, repeat: int, env: dict) -> float:
    best = float("inf")
    for _ in range(repeat):
        bench_engine.remove(out)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        best = min(best, elapsed)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=None, help="fp32 size of each checkpoint (1 GB = 1e9 bytes; default 0.5 without --shapes)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(bench_engine.LLM_SHAPES), default=[],
                        help="also (after --size-gb) real LLM shapes in bf16, HF-sharded, as bench_engine.py generates them")
    parser.add_argument("--mergekit-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="what mergekit computes in on the bf16 shapes (its `dtype`; it writes bf16 either way)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each command (best wall time)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "peers", help="checkpoints, outputs and mergekit's virtualenv")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="default: every method both sides have")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from mlflow_taskvec.engine.methods import METHODS as OURS

    sizes = [args.size_gb] if args.size_gb is not None else ([] if args.shapes else [0.5])
    models = [*sizes, *args.shapes]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    mergekit = setup_mergekit(work)
    methods = args.methods or [m for m in METHODS if m in OURS]
    ours_exe = str(Path(sys.executable).with_name("mlflow-taskvec"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    info = bench_engine.machine_info()
    machine = f"{info['cpu']}, {info['cores']} cores, {info['ram_gb']:.0f} GiB RAM; torch {info['torch']}, Python {info['python']}"
    rows, described = [], []
    for model in models:
        label = bench_engine.model_label(model)
        dtype = bench_engine.plan_for(model).get("dtype", "float32")
        mergekit_dtype = args.mergekit_dtype if dtype == "bfloat16" else dtype
        described.append(f"{label} ({dtype} out, mergekit computing in {mergekit_dtype})")
        folders = llama_folders(work / (f"model-{model}" if isinstance(model, str) else f"model-{model:g}gb"), model, args.seed)
        for method in methods:
            mk_config, recipe = write_configs(work, folders, method, dtype, mergekit_dtype)
            mk_out, our_out = work / f"out-mergekit-{method}", work / f"out-ours-{method}"
            theirs = timed([str(mergekit), str(mk_config), str(mk_out), "--no-copy-tokenizer", "--out-shard-size", "100B"], mk_out, args.repeat, env)
            ours = timed([ours_exe, "compose", str(recipe), "-o", str(our_out), "--overwrite", "-q"], our_out, args.repeat, env)
            diff = bench_engine.max_abs_diff(mk_out, our_out)
            target = TARGETS.get(method)
            ratio = theirs / ours
            rows.append([method, label, f"{ours:.2f}", f"{theirs:.2f}", f"{ratio:.1f}x", f"{diff:.2g}",
                         f">= {target:g}x" if target else "-", ("PASS" if ratio >= target else "MISS") if target else "-"])
            print(f"  {method} @ {label}: ours {ours:.2f} s, mergekit {theirs:.2f} s, {ratio:.1f}x, max |diff| {diff:.2g} (in float32)", flush=True)
    header = ["method", "model", "ours s", "mergekit s", "ours faster by", "max abs diff", "target", "result"]
    print(f"\nmachine: {machine}; {MERGEKIT}; Llama-shaped checkpoints {'; '.join(described)}, base + 3 fine-tunes "
          f"(weights {', '.join(map(str, WEIGHTS))}, scale {SCALE}); whole process, best of {args.repeat}; "
          f"max abs diff in float32\n")
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|---|---|---:|---:|---:|---:|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for line in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
