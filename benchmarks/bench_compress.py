#!/usr/bin/env python
"""Compressed task vectors on the digits example: size against accuracy.

Trains the example's base (300 steps on the ten digits) and its four addition
fine-tunes (parity, large, mod3, loop; 100 steps each), extracts their task
vectors (fp32), compresses each with every format at two settings (bitdelta has
no setting: one row), and composes the addition (task arithmetic, all weights 1)
from each set of vectors. As in the
paper, the scale is picked on the validation split (0.0 to 2.0, step 0.05) and the
composite's mean normalized accuracy (its accuracy over each task's own fine-tune's)
is measured on the test split. Prints, per format and setting: the size ratio (dense
fp32 tensor bytes over stored tensor bytes), the mean normalized accuracy, and that
relative to the composite of the uncompressed vectors, against the targets.

    .venv/bin/python benchmarks/bench_compress.py [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "examples" / "digits"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import digits_tasks as D  # noqa: E402
from pipeline import FINETUNE_LR, FINETUNE_STEPS  # noqa: E402  (the fine-tunes of the paper's results)
from mlflow_taskvec import TaskVector, merge  # noqa: E402
from mlflow_taskvec.engine.compressed import compress  # noqa: E402

TASKS = ("parity", "large", "mod3", "loop")
# The paper's grid (step 0.05) extended to 2.0: vectors with most entries trimmed need larger scales.
SCALES = [round(0.05 * i, 2) for i in range(41)]
# (format, setting, target ratio or None, target relative accuracy or None)
VARIANTS = [
    ("sparse", {"density": 0.1}, None, 0.97),
    ("sparse", {"density": 0.3}, None, None),
    ("bitdelta", {}, 30.0, 0.95),
    ("lowrank", {"density": 0.1}, None, 0.99),
    ("lowrank", {"energy": 0.9}, None, None),
]


def _mean_normalized(state_dict, finetuned_accuracy: dict[str, float], split: str) -> float:
    model = D.load_weights(state_dict)
    return sum(D.accuracy(model, t, split) / finetuned_accuracy[t][split] for t in TASKS) / len(TASKS)


def addition(base: Path, vectors: list[TaskVector], finetuned_accuracy) -> tuple[float, float]:
    """(scale picked on validation, mean normalized test accuracy) of the addition composite."""
    def composite(scale):
        return merge(base, vectors, [1.0] * len(vectors), scale=scale)

    best = max(SCALES, key=lambda s: (_mean_normalized(composite(s), finetuned_accuracy, "validation"), -s))
    return best, _mean_normalized(composite(best), finetuned_accuracy, "test")


def run(work: Path) -> list[dict]:
    base_model = D.train(D.build_model(0), "digits", steps=300, seed=0)
    save_file(base_model.state_dict(), str(work / "base.safetensors"))
    finetuned_accuracy, dense = {}, []
    for task in TASKS:
        model = D.train(copy.deepcopy(base_model), task, steps=FINETUNE_STEPS, lr=FINETUNE_LR, optimizer="sgd")
        finetuned_accuracy[task] = {split: D.accuracy(model, task, split) for split in ("validation", "test")}
        save_file(model.state_dict(), str(work / f"{task}.safetensors"))
        TaskVector.extract(work / "base.safetensors", work / f"{task}.safetensors", task=task).save(work / f"{task}-vector.safetensors")
        dense.append(TaskVector.load(work / f"{task}-vector.safetensors"))
    dense_bytes = sum(v.spec(n).nbytes for v in dense for n in v.names)
    scale, reference = addition(work / "base.safetensors", dense, finetuned_accuracy)
    rows = [dict(format="dense fp32", setting="-", ratio=1.0, scale=scale, accuracy=reference, relative=1.0, targets="-", result="-")]
    for layout, setting, target_ratio, target_relative in VARIANTS:
        label = "-".join([layout, *(f"{k}{v:g}" for k, v in setting.items())])
        stored_bytes, vectors = 0, []
        for task, vector in zip(TASKS, dense):
            result = compress(vector, work / f"{task}-{label}.safetensors", layout, **setting)
            stored_bytes += result.stored_bytes
            vectors.append(TaskVector.load(work / f"{task}-{label}.safetensors"))
        scale, accuracy = addition(work / "base.safetensors", vectors, finetuned_accuracy)
        ratio, relative = dense_bytes / stored_bytes, accuracy / reference
        targets, met = [], []
        if target_ratio is not None:
            targets.append(f">= {target_ratio:g}x smaller")
            met.append(("size", ratio >= target_ratio))
        if target_relative is not None:
            targets.append(f">= {target_relative:g} of dense")
            met.append(("accuracy", relative >= target_relative))
        missed = [what for what, ok in met if not ok]
        rows.append(dict(
            format=layout, setting=", ".join(f"{k} {v:g}" for k, v in setting.items()) or "-", ratio=ratio, scale=scale,
            accuracy=accuracy, relative=relative, targets="; ".join(targets) or "-",
            result="-" if not met else ("PASS" if not missed else f"MISS ({', '.join(missed)})"),
        ))
    return rows


def render(rows: list[dict], markdown: bool) -> str:
    header = ["format", "setting", "x smaller", "scale", "mean normalized acc", "vs dense", "target", "result"]
    cells = [[r["format"], r["setting"], f"{r['ratio']:.1f}x", f"{r['scale']:g}", f"{r['accuracy']:.3f}", f"{r['relative']:.3f}", r["targets"], r["result"]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [header, *cells])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as work:
        rows = run(Path(work))
    print(render(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
