#!/usr/bin/env python
"""The sha256 of the adapters ``merge_to_adapter`` writes for bench_peft.py's inputs: a speed-up of
the adapter merge must not change one of them.

    .venv/bin/python benchmarks/peft_bits.py --write bits.json     # before a change
    .venv/bin/python benchmarks/peft_bits.py --compare bits.json   # after it: exit 1 on any difference

Each row is one merge of ``--adapters`` r=``--rank`` adapters of the ``--shape`` base (bench_peft.py
generates and reuses them; ``--layers`` of its layers, default all): ties (density 0.5) with the
default exact SVD, ties with ``svd="randomized"``, and task arithmetic (the concatenated factors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

ROWS = {"ties": ("ties", "exact"), "ties_randomized": ("ties", "randomized"), "task_arithmetic": ("task_arithmetic", "exact")}


def digests(base: Path, adapters: list[Path], layers: int | None) -> dict[str, str]:
    import torch

    from mlflow_taskvec.engine.adapter_merge import merge_to_adapter
    from mlflow_taskvec.engine.taskvector import TaskVector

    torch.set_num_threads(1)
    include = [f"model.layers.{i}.*" for i in range(layers)] if layers is not None else None
    vectors = [TaskVector.load(a, base=base)._selected(include, None, None) if include else TaskVector.load(a, base=base) for a in adapters]
    weights = [1.0 / len(adapters)] * len(adapters)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row, (method, svd) in ROWS.items():
            params = {"density": 0.5} if method == "ties" else {}
            folder = Path(tmp) / row
            merge_to_adapter(base, vectors, weights, folder, method=method, params=params, svd=svd, base_model_name_or_path=str(base))
            out[row] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}
            print(f"  {row:<16} {out[row]['adapter_model.safetensors'][:16]}", flush=True)
    return out


def main() -> None:
    from bench_peft import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "peft")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path)
    group.add_argument("--compare", type=Path)
    args = parser.parse_args()
    base, adapters = generate(args.workdir / f"{args.shape}-{args.adapters}x{args.rank}", args.shape, args.adapters, args.rank, 0)
    found = digests(base, adapters, args.layers)
    if args.write:
        args.write.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
        return
    expected = json.loads(args.compare.read_text())
    differ = sorted(row for row in expected if expected[row] != found.get(row))
    print(f"{len(expected) - len(differ)} of {len(expected)} adapters identical to {args.compare}" + (f"; differ: {', '.join(differ)}" if differ else ""))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
