#!/usr/bin/env python
"""Benchmark of LoRA-to-LoRA merging (``output_format: peft``) against the dense route.

Generates a Llama-shaped fp32 base (one safetensors file in a folder; by default a reduced
shape, ``--shape 1.1b`` for TinyLlama's: hidden 2048, intermediate 5632, 22 layers, vocab
32000) and ``--adapters`` PEFT LoRA adapters of rank ``--rank`` on every linear module of
every layer (q, k, v, o, gate, up, down; random factors, fixed seed). Then, each in a
fresh subprocess, timed, with its bytes written and its peak anonymous memory (RssAnon sampled
every 5 ms, minus before the operation; mmap'd input pages do not count, as in bench_engine.py):

- ``peft_task_arithmetic``  ``merge_to_adapter``: the factors concatenated (exact)
- ``peft_ties``             ``merge_to_adapter``, ties (density 0.5): per module the inputs'
                            dense deltas, ties, truncated SVD back to the sum of the input ranks
- ``peft_ties_randomized`` the same with ``svd="randomized"`` (opt-in: a seeded randomized SVD)
- ``dense_task_arithmetic`` what it replaces: ``merge_to`` the dense composite, then
                            ``export_lora`` of composite - base at the same rank
- ``dense_ties``            the same with ties

and prints the speed-ups against the targets (task arithmetic >= 20x, ties >= 5x), in wall and
in CPU seconds (the operation's process time, all its threads: on a shared machine the steadier figure). Every
operation runs on one torch thread (as the engine streams), the dense route too.

    .venv/bin/python benchmarks/bench_peft.py                  # the reduced shape
    .venv/bin/python benchmarks/bench_peft.py --shape 1.1b     # the 1.1B shape (4.4 GB base, slow on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

SHAPES = {  # name: (hidden, intermediate, layers, vocab)
    "small": (512, 1376, 4, 8000),
    "reduced": (1024, 2816, 8, 16000),
    "1.1b": (2048, 5632, 22, 32000),
}
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = {"task_arithmetic": 20.0, "ties": 5.0}
DENSITY = 0.5


def shapes_of(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in MODULES[:4]:
            shapes[f"{p}{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    return shapes


def generate(work: Path, shape: str, adapters: int, rank: int, seed: int) -> tuple[Path, list[Path]]:
    """The base folder and the adapter folders (reused when their recorded settings match)."""
    import torch
    from safetensors.torch import save_file

    from mlflow_taskvec.engine import CheckpointWriter, TensorSpec

    hidden, inter, layers, vocab = SHAPES[shape]
    shapes = shapes_of(hidden, inter, layers, vocab)
    stamp = {"shape": shape, "adapters": adapters, "rank": rank, "seed": seed}
    base = work / "base"
    folders = [work / f"adapter-{i}" for i in range(adapters)]
    if (work / "stamp.json").is_file() and json.loads((work / "stamp.json").read_text()) == stamp:
        print(f"  reusing the base and adapters in {work}")
        return base, folders
    shutil.rmtree(work, ignore_errors=True)
    base.mkdir(parents=True)
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    specs = {n: TensorSpec(torch.float32, s) for n, s in shapes.items()}
    with CheckpointWriter(base / "model.safetensors", specs, {"format": "pt"}) as writer:
        for name in writer.order:
            numel = specs[name].numel
            for start in range(0, numel, 1 << 22):
                n = min(numel, start + (1 << 22)) - start
                t = torch.randn(n, generator=gen)
                writer.write(name, t.mul_(0.1).add_(1.0) if len(specs[name].shape) == 1 else t.mul_(0.02))
        writer.commit()
    targets = [f"model.layers.{i}.{m}" for i in range(layers) for m in MODULES]
    for folder in folders:
        folder.mkdir()
        tensors = {}
        for module in targets:
            out, cols = shapes[f"{module}.weight"]
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=gen).mul_(0.01)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen).mul_(0.01)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted({m.rsplit(".", 1)[1] for m in MODULES}),
                  "base_model_name_or_path": str(base), "bias": "none", "fan_in_fan_out": False}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    (work / "stamp.json").write_text(json.dumps(stamp), "utf-8")
    params = sum(math.prod(s) for s in shapes.values())
    print(f"  generated a base of {params / 1e6:.0f}M parameters ({4 * params / 1e9:.2f} GB) and {adapters} r={rank} adapters in {time.perf_counter() - started:.1f} s")
    return base, folders


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the child: one operation ----------------------------------------------------------------------------


def child(op: str, base: Path, adapters: list[Path], out: Path) -> dict:
    from mlflow_taskvec.engine.adapter_merge import merge_to_adapter
    from mlflow_taskvec.engine.lora import export_lora
    from mlflow_taskvec.engine.merging import merge_to
    from mlflow_taskvec.engine.taskvector import TaskVector

    from bench_engine import AnonSampler, read_anon_kb

    vectors = [TaskVector.load(a, base=base) for a in adapters]
    weights = [1.0 / len(adapters)] * len(adapters)
    method = "ties" if "_ties" in op else "task_arithmetic"
    svd = "randomized" if op.endswith("_randomized") else "exact"
    params = {"density": DENSITY} if method == "ties" else {}
    rank = sum(v.low_rank_source.rank("model.layers.0.self_attn.q_proj.weight") for v in vectors)  # every module: the sum of the input ranks
    baseline = read_anon_kb()
    sampler = AnonSampler(0.005)
    sampler.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    written = 0
    if op.startswith("peft_"):
        result = merge_to_adapter(base, vectors, weights, out / "adapter", method=method, params=params, svd=svd, base_model_name_or_path=str(base))
        written = result.bytes_written
        extra = {"r": result.r, "max_relative_error": result.relative_error}
    else:
        merge_to(base, vectors, weights, out / "composite.safetensors", method=method, params=params)
        written += folder_bytes(out / "composite.safetensors")
        export = export_lora(TaskVector.extract(base / "model.safetensors", out / "composite.safetensors"), out / "adapter", rank=rank)
        written += folder_bytes(out / "adapter")
        extra = {"r": export.r, "max_relative_error": max(t.relative_error for t in export.tensors)}
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    sampler.stop()
    peak = max(sampler.peak_kb, read_anon_kb())
    return {"seconds": seconds, "cpu_s": cpu_seconds, "bytes_written": written, "peak_anon_mb": (peak - baseline) / 1024, **extra}


def run_child(op: str, base: Path, adapters: list[Path], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", op, "--base", str(base), "--out", str(out), "--adapter-folders", *map(str, adapters)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    output = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{op} failed (exit {os.waitstatus_to_exitcode(status)})")
    row = json.loads(output.strip().splitlines()[-1])
    row["child_cpu_s"] = usage.ru_utime + usage.ru_stime  # the whole child, its imports included
    row["peak_rss_mb"] = usage.ru_maxrss / 1024  # with the mmap'd input pages the fingerprints read
    shutil.rmtree(out, ignore_errors=True)
    return row


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="reduced")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "peft")
    parser.add_argument("--ops", default="peft_task_arithmetic,dense_task_arithmetic,peft_ties,peft_ties_randomized,dense_ties")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-folders", nargs="*", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import warnings

        warnings.simplefilter("ignore")
        import torch

        # every op on one torch thread (the engine's own choice while streaming): on a shared, busy
        # machine intra-op threads stall each SVD and densification 10-50x, which would flatter neither side
        torch.set_num_threads(1)
        print(json.dumps(child(args.child, args.base, args.adapter_folders, args.out)))
        return
    hidden, inter, layers, vocab = SHAPES[args.shape]
    print(f"bench-peft: shape {args.shape} (hidden {hidden}, intermediate {inter}, {layers} layers, vocab {vocab}), "
          f"{args.adapters} adapters r={args.rank}, on {machine()}")
    data = args.workdir / f"{args.shape}-{args.adapters}x{args.rank}"
    base, adapters = generate(data, args.shape, args.adapters, args.rank, args.seed)
    rows = {}
    for op in args.ops.split(","):
        rows[op] = run_child(op, base, adapters, args.workdir / "out")
        r = rows[op]
        print(f"  {op:<22} {r['seconds']:8.2f} s ({r['cpu_s']:7.2f} CPU s)  {r['bytes_written'] / 1e6:9.1f} MB written  peak anon {r['peak_anon_mb']:6.0f} MB (RSS {r['peak_rss_mb']:5.0f})  "
              f"r {r['r']}  max relative error {r['max_relative_error']:.3g}", flush=True)
    for method, target in TARGETS.items():
        dense_op = f"dense_{method}"
        for peft_op in (f"peft_{method}", f"peft_{method}_randomized"):
            if peft_op in rows and dense_op in rows:
                speedup = rows[dense_op]["seconds"] / rows[peft_op]["seconds"]
                cpu_speedup = rows[dense_op]["cpu_s"] / rows[peft_op]["cpu_s"]
                less = rows[dense_op]["bytes_written"] / max(1, rows[peft_op]["bytes_written"])
                verdict = "PASS" if speedup >= target else "MISS"
                print(f"  {peft_op}: {speedup:.1f}x faster ({cpu_speedup:.1f}x in CPU seconds; target {target:g}x: {verdict}), {less:.0f}x fewer bytes written")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "adapters": args.adapters, "rank": args.rank, "machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
