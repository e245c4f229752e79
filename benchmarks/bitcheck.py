#!/usr/bin/env python
"""Bit check: the sha256 of every file every merge method writes, on small generated checkpoints.

Speed work must not change a bit. This script generates, from a fixed seed, a base and
three fine-tunes in two layouts (fp32 single files; bf16 HF-sharded folders with an
index), composes every method of ``mlflow-taskvec methods`` on each with both output
dtypes (float32, bfloat16; the sharded one into a sharded folder), extracts one task
vector per layout, and prints one JSON object: ``{output label: {file: sha256}}``.

The tensors cross the engine's chunk size (one has 1.18M entries, not a multiple of a
chunk), include 1-D norms and exact zeros in the deltas (ties at the trim thresholds).

    python benchmarks/bitcheck.py > now.json                  # on the code of this checkout
    python benchmarks/bitcheck.py --compare benchmarks/bitcheck_baseline.json
    python benchmarks/bitcheck.py --threads 4 --compare benchmarks/bitcheck_baseline.json

``--compare`` exits 1 and names the outputs that differ from the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SHAPES = {
    "model.embed_tokens.weight": (2304, 512),  # 1,179,648 entries: two chunks, the second partial
    "model.layers.0.self_attn.q_proj.weight": (512, 512),
    "model.layers.0.self_attn.k_proj.weight": (128, 512),
    "model.layers.0.mlp.down_proj.weight": (512, 1376),
    "model.layers.0.input_layernorm.weight": (512,),
    "model.norm.weight": (512,),
}
# A parameter set for every method that needs one (the others run with their defaults).
PARAMS = {
    "ties": {"density": 0.2}, "magnitude_prune": {"density": 0.3},
    "breadcrumbs": {"density": 0.2, "gamma": 0.01}, "breadcrumbs_ties": {"density": 0.2, "gamma": 0.01},
    "consensus_ties": {"density": 0.2}, "dare_linear": {"density": 0.5, "seed": 3}, "dare_ties": {"density": 0.5, "seed": 3},
    "della": {"density": 0.4, "epsilon": 0.1, "seed": 1}, "della_linear": {"density": 0.4, "epsilon": 0.1, "seed": 1},
    "slerp": {"t": 0.3},
}
WEIGHTS = [1.0, 0.7, 0.5]
SCALE = 0.6


def generate(directory: Path, seed: int = 0) -> dict[str, list[Path]]:
    """The two layouts' base and fine-tunes: ``{"fp32": [base, ft1..ft3], "bf16_sharded": [...]}``."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * 0.02 + (1.0 if len(s) == 1 else 0.0) for n, s in SHAPES.items()}
    fts = []
    for i in range(3):
        ft = {}
        for n, t in base.items():
            noise = torch.randn(t.shape, generator=g) * 1e-3 * (i + 1)
            noise[torch.rand(t.shape, generator=g) < 0.05] = 0.0  # entries the fine-tune left alone
            ft[n] = t + noise
        fts.append(ft)
    out = {"fp32": [], "bf16_sharded": []}
    for label, sd in [("base", base)] + [(f"ft{i + 1}", ft) for i, ft in enumerate(fts)]:
        path = directory / f"{label}.safetensors"
        save_file(sd, str(path))
        out["fp32"].append(path)
        folder = directory / f"{label}_bf16"
        folder.mkdir()
        names = sorted(sd)
        shards = [names[:2], names[2:]]  # the embedding alone in the first, the rest in the second
        weight_map = {}
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: sd[n].to(torch.bfloat16).contiguous() for n in shard}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        total = sum(sd[n].numel() * 2 for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 512}) + "\n")
        out["bf16_sharded"].append(folder)
    return out


def file_hashes(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    root = path.parent if path.is_file() else path
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(threads: int | None, only: list[str] | None = None) -> dict[str, dict[str, str]]:
    from mlflow_taskvec.engine import METHODS, TaskVector, merge_to

    extra = {}
    if threads is not None:
        if "threads" not in inspect.signature(merge_to).parameters:
            raise SystemExit("--threads: this checkout's merge_to takes no threads")
        extra["threads"] = threads
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="taskvec-bitcheck-") as tmp:
        tmp = Path(tmp)
        layouts = generate(tmp)
        for layout, (base, *fts) in layouts.items():
            results[f"inputs/{layout}"] = {p.name + "/" + k: v for p in (base, *fts) for k, v in file_hashes(p).items()}
            vectors = [TaskVector.extract(base, ft, task=f"task{i}") for i, ft in enumerate(fts)]
            out = tmp / f"extract_{layout}.safetensors"
            vectors[0].save(out)
            results[f"extract/{layout}"] = file_hashes(out)
            for method in sorted(METHODS):
                if only and method not in only:
                    continue
                m = METHODS[method]
                n = m.inputs or 3
                for dtype in ("float32", "bfloat16"):
                    sharded = layout == "bf16_sharded"
                    target = tmp / f"{method}_{layout}_{dtype}" if sharded else tmp / f"{method}_{layout}_{dtype}.safetensors"
                    merge_to(
                        base, vectors[:n], WEIGHTS[:n], target, method=method, scale=SCALE, params=PARAMS.get(method, {}),
                        dtype=dtype, max_shard_size="2MB" if sharded else None, **extra,
                    )
                    results[f"{method}/{layout}/{dtype}"] = file_hashes(target)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="pass threads=N to merge_to (when this checkout takes it)")
    ap.add_argument("--compare", type=Path, default=None, help="a baseline JSON: exit 1 if any output differs")
    ap.add_argument("--methods", nargs="*", default=None, help="only these methods")
    ap.add_argument("--output", type=Path, default=None, help="write the JSON here (else stdout)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = run(args.threads, args.methods)
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    if args.output:
        args.output.write_text(text)
    elif args.compare is None:
        sys.stdout.write(text)
    if args.compare is not None:
        baseline = json.loads(args.compare.read_text())
        differ = sorted(k for k in results if baseline.get(k) != results[k])
        missing = sorted(k for k in baseline if k not in results and not args.methods)
        for k in differ:
            print(f"DIFFERS: {k}", file=sys.stderr)
        for k in missing:
            print(f"MISSING: {k}", file=sys.stderr)
        print(f"{len(results) - len(differ)} of {len(results)} outputs identical to {args.compare}")
        return 1 if differ or missing else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
