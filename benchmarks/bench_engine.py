#!/usr/bin/env python
"""Benchmark of the streaming engine: wall time and peak anonymous memory.

Generates a Llama-shaped fp32 checkpoint (a base and three fine-tunes, each a
single safetensors file; fine-tune = base + small noise, fixed seed) per ``--sizes``,
and, per ``--shapes``, a real LLM's shape in bf16 in the HF layout (sharded in 1 GB
shards with an index and a config.json): ``tinyllama-1.1b`` (hidden 2048, 22 layers,
intermediate 5632, 32 query / 4 key-value heads, vocab 32000) or ``llama-7b``. Then
it runs every operation in a fresh subprocess and reports, per model:

- ``extract``          ``TaskVector.extract(base, ft1).save(out)``
- ``task_arithmetic``  ``merge(base, [extract(base, ft_i)], [1, 1, 1], scale=0.5)``
- ``ties``             the same inputs, ``method="ties"``, ``density``
- ``magnitude_prune``  the same inputs, the ties trim then task arithmetic
- ``compose``          a recipe of the same task arithmetic (``compose_to``) composed into a folder
- ``compose_copy``     the same, then
                       the folder copied (what keeping a composite somewhere else costs)
- ``compose_register`` the same recipe through ``compose --register``: composed, logged
                       and registered on a sqlite store beside the checkpoints (MLflow
                       imported before the clock starts, the store created by the warm-up; local
                       artifacts beside it)
- ``compose_register_server`` the same against a team server: ``mlflow server`` on a fresh
                       PostgreSQL database (``--pg``; dropped at the end), artifacts proxied by the
                       server into a local folder (``--serve-artifacts``; the client sees only
                       http), started and warmed before the clock starts; the version checked
                       READY on the server (vs ``compose_copy``; skipped without PostgreSQL)
- ``verify``           ``verify`` of that composite (registered before the clock starts): its inputs
                       fingerprinted afresh, its stored weights downloaded and checked, the recipe
                       recomposed (vs ``compose``)
- ``floor2/3/4``      the I/O floor: read every byte of 2 (base, ft1), 3 or 4 inputs
                       from their mmap views (chunk copies, the engine's chunk size)
                       and write one base-sized file through ``StreamingWriter``;
                       no method logic, no hashing
- the later methods    ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``,
                       ``consensus_ta``, ``consensus_ties`` (vs floor4), ``slerp`` (two
                       fine-tunes, vs floor3), ``tsv_m``, ``iso_c``, ``iso_cts`` (vs svd_floor)
- ``svd_floor``        the SVD methods' floor: one ``torch.linalg.svd`` per 2-D tensor per
                       input (of ``ft_i - base``, 3 inputs), reading as the floors do, nothing written
- ``naive_*``          what reference code does: ``safetensors.torch.load_file``
                       everything, task vectors as dicts, merge whole tensors in
                       memory, ``save_file`` (+ fsync, as the engine does)

Peak memory is the peak of ``RssAnon`` (sampled every ~2 ms in a background
thread, and read once more at the end) minus ``RssAnon`` right before the
operation starts, after torch and the package are imported. mmap'd input pages
are file-backed and do not count; what the operation allocates does.

    .venv/bin/python benchmarks/bench_engine.py --sizes 0.5 2 --markdown
    .venv/bin/python benchmarks/bench_engine.py --sizes 0.5 --shapes tinyllama-1.1b --repeat 3 --markdown

The engine's merges run on every core (its default ``threads``); docs/benchmarks.md has
the figures and how to reproduce them (the 7B shape on a bigger machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 10**9
VOCAB = 32000
N_FINETUNES = 3
SCALE = 0.5
# (largest size in GB, hidden, intermediate): Llama-like proportions per size class.
SHAPE_CLASSES = [(0.2, 256, 688), (1.0, 768, 2048), (4.0, 1536, 4096), (12.0, 2048, 5632), (math.inf, 4096, 11008)]

# Real models' shapes (bf16, HF-sharded): name -> (hidden, layers, intermediate, query heads, key-value heads, vocab);
# ``tiny-llama`` (4 MB a checkpoint, 1 MB shards) is a Llama of the same layout for checking the benchmarks themselves.
LLM_SHAPES = {"tinyllama-1.1b": (2048, 22, 5632, 32, 4, 32000), "llama-7b": (4096, 32, 11008, 32, 32, 32000),
              "tiny-llama": (256, 2, 688, 8, 2, 1024)}
LLM_SHARD = "1GB"
SHARD_OF = {"tiny-llama": "1MB"}  # a shape's shard size where it is not LLM_SHARD

ELEMENTWISE = ["dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "consensus_ta", "consensus_ties"]
WHOLE_TENSOR = ["della", "della_linear", "slerp"]  # ranks per row / one angle per tensor: a tensor at a time
SVD = ["tsv_m", "iso_c", "iso_c_gram", "iso_cts"]
# ops that run a method under another name (an opt-in algorithm of it)
METHOD_OF = {"iso_c_gram": "iso_c"}
OPS = ["floor2", "extract", "floor3", "floor4", "task_arithmetic", "ties", "magnitude_prune", *ELEMENTWISE, *WHOLE_TENSOR, "svd_floor", *SVD,
       "naive_task_arithmetic", "naive_ties", "compose", "compose_copy", "compose_register", "compose_register_server", "verify"]
# ops that register on MLflow (its import is not what is measured) and the ones that need the team server
MLFLOW_OPS = ("compose_register", "compose_register_server", "verify")
SERVER_OPS = ("compose_register_server",)
# The engine's merge ops (method names), as the peers benchmark runs them too.
MERGE_OPS = ("task_arithmetic", "ties", "magnitude_prune")
FLOOR_OF = {"extract": "floor2", "task_arithmetic": "floor4", "ties": "floor4", "magnitude_prune": "floor4",
            "naive_task_arithmetic": "floor4", "naive_ties": "floor4", "compose_register": "compose_copy", "compose_register_server": "compose_copy", "verify": "compose",
            **{op: "floor4" for op in ELEMENTWISE + WHOLE_TENSOR}, "slerp": "floor3", **{op: "svd_floor" for op in SVD}}
# op: (max ratio to its floor or None, max peak anon MB or None): issue 21's targets
TARGETS = {"extract": (None, 300), "task_arithmetic": (1.3, 300), "ties": (2.5, 300), "magnitude_prune": (2.5, 300), "compose_register": (1.3, None), "compose_register_server": (2.0, None), "verify": (2.5, None),
           **{op: (2.5, 300) for op in ELEMENTWISE}, "della": (4.0, 300), "della_linear": (4.0, 300), "slerp": (2.0, 300),
           "tsv_m": (1.0, None), "iso_c": (0.35, None), "iso_c_gram": (0.35, None), "iso_cts": (1.2, None)}
# the parameters each method runs with (ties and magnitude_prune: --density)
METHOD_PARAMS = {
    "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.2, "gamma": 0.01}, "breadcrumbs_ties": {"density": 0.2, "gamma": 0.01},
    "della": {"density": 0.4, "epsilon": 0.1}, "della_linear": {"density": 0.4, "epsilon": 0.1},
    "consensus_ta": {}, "consensus_ties": {"density": 0.2}, "slerp": {"t": 0.5}, "tsv_m": {}, "iso_c": {}, "iso_c_gram": {"gram": 1}, "iso_cts": {},
}
# Rough peak of the naive ops in model sizes (3 task vectors + sum + base + merged + temporaries).
NAIVE_MEMORY_FACTOR = {"naive_task_arithmetic": 7.0, "naive_ties": 6.5}
# Engine output vs naive output (same maths, whole tensors instead of chunks).
CHECK_PAIRS = [("task_arithmetic", "naive_task_arithmetic"), ("ties", "naive_ties")]


# -- the model -------------------------------------------------------------------


def plan_model(size_gb: float) -> dict:
    """Llama shapes whose fp32 size is close to ``size_gb`` (1 GB = 1e9 bytes)."""
    _, hidden, inter = next(c for c in SHAPE_CLASSES if size_gb < c[0])
    target = size_gb * GB / 4
    fixed = 2 * VOCAB * hidden + hidden  # embed_tokens, lm_head, final norm
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden), "lm_head.weight": (VOCAB, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    params = sum(math.prod(s) for s in shapes.values())
    largest = max(shapes, key=lambda n: math.prod(shapes[n]))
    return {"hidden": hidden, "intermediate": inter, "layers": layers, "shapes": shapes,
            "params": params, "bytes": 4 * params, "largest": largest}


def plan_llm(shape: str) -> dict:
    """The tensors of a Llama-architecture model of the named shape (``LLM_SHAPES``), in bf16."""
    hidden, layers, inter, heads, kv_heads, vocab = LLM_SHAPES[shape]
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    params = sum(math.prod(s) for s in shapes.values())
    largest = max(shapes, key=lambda n: math.prod(shapes[n]))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    return {"hidden": hidden, "intermediate": inter, "layers": layers, "shapes": shapes, "params": params, "bytes": 2 * params,
            "largest": largest, "dtype": "bfloat16", "config": config}


def plan_for(model: "float | str") -> dict:
    """A size in GB (fp32, single files) or the name of an LLM shape (bf16, HF-sharded)."""
    return plan_llm(model) if isinstance(model, str) else plan_model(model)


def model_label(model: "float | str") -> str:
    return model if isinstance(model, str) else f"{model:g} GB"


def generate_model(directory: Path, model: "float | str", seed: int) -> list[Path]:
    return generate_llm(directory, model, seed) if isinstance(model, str) else generate(directory, model, seed)


def generate_llm(directory: Path, shape: str, seed: int) -> list[Path]:
    """HF folders base/ and ft1..ft3/: bf16 weights in 1 GB shards with an index, and a config.json."""
    import torch

    plan = plan_llm(shape)
    paths = [directory / "base"] + [directory / f"ft{i + 1}" for i in range(N_FINETUNES)]
    tag = {"bench.shape": shape, "bench.seed": str(seed), "bench.params": str(plan["params"])}
    if _reusable(paths, tag, lambda p: (p / "config.json").is_file()):
        return paths
    _write_set(directory, paths, plan["shapes"], tag, seed, torch.bfloat16, max_shard_size=SHARD_OF.get(shape, LLM_SHARD))
    for p in paths:
        (p / "config.json").write_text(json.dumps(plan["config"], indent=2) + "\n")
    return paths


def generate(directory: Path, size_gb: float, seed: int) -> list[Path]:
    """Write base.safetensors and ft1..ft3.safetensors, chunk by chunk (memory stays small)."""
    import torch

    plan = plan_model(size_gb)
    paths = [directory / "base.safetensors"] + [directory / f"ft{i + 1}.safetensors" for i in range(N_FINETUNES)]
    tag = {"bench.size_gb": repr(size_gb), "bench.seed": str(seed), "bench.params": str(plan["params"])}
    if _reusable(paths, tag, Path.is_file):
        return paths
    _write_set(directory, paths, plan["shapes"], tag, seed, torch.float32)
    return paths


def _reusable(paths: list[Path], tag: dict[str, str], complete) -> bool:
    """Whether every checkpoint of a set is there (``complete(path)``) and carries ``tag``."""
    from mlflow_taskvec.engine import open_checkpoint

    if not all(complete(p) for p in paths):
        return False
    try:
        if all({k: open_checkpoint(p).metadata().get(k) for k in tag} == tag for p in paths):
            print(f"  reusing the checkpoints in {paths[0].parent}")
            return True
    except Exception:
        pass
    return False


def _write_set(directory: Path, paths: list[Path], shapes: dict, tag: dict[str, str], seed: int, dtype, max_shard_size=None) -> None:
    """A base and its fine-tunes (base + 1e-3 noise) at ``paths``, drawn chunk by chunk from one
    seeded generator (memory stays small): norms around 1, other weights of scale 0.02."""
    import torch

    from mlflow_taskvec.engine import CheckpointWriter, TensorSpec

    directory.mkdir(parents=True, exist_ok=True)
    for p in paths:
        remove(p)
    started = time.perf_counter()
    specs = {n: TensorSpec(dtype, s) for n, s in shapes.items()}
    gen = torch.Generator().manual_seed(seed)
    writers = [CheckpointWriter(p, specs, tag, max_shard_size=max_shard_size) for p in paths]
    try:
        for name in writers[0].order:
            is_norm = len(specs[name].shape) == 1
            numel = specs[name].numel
            for start in range(0, numel, 1 << 22):
                n = min(numel, start + (1 << 22)) - start
                base = torch.randn(n, generator=gen)
                base = base.mul_(0.1).add_(1.0) if is_norm else base.mul_(0.02)
                writers[0].write(name, base.to(dtype))
                for w in writers[1:]:
                    w.write(name, (base + torch.randn(n, generator=gen).mul_(1e-3)).to(dtype))
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    print(f"  generated {len(paths)} checkpoints in {time.perf_counter() - started:.1f} s")


# -- the child: one operation, measured --------------------------------------------


def read_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class AnonSampler(threading.Thread):
    """Samples RssAnon every ``interval`` seconds; ``peak_kb`` is the highest seen."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kb = read_anon_kb()
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_kb = max(self.peak_kb, read_anon_kb())
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_op(op: str, base: str, fts: list[str], out: str, density: float, device: str | None = None):
    """Run ``op``; the registering ops return what they registered."""
    import torch

    from mlflow_taskvec.engine import TaskVector, merge_to, open_checkpoint
    from mlflow_taskvec.engine.io import StreamingWriter
    from mlflow_taskvec.engine.streaming import chunk_ranges

    on = {"device": device} if device else {}  # none: the default streaming executor
    if op == "extract":
        TaskVector.extract(base, fts[0]).save(out, **on)
    elif op in MERGE_OPS:
        vectors = [TaskVector.extract(base, ft) for ft in fts]
        params = {"density": density} if op != "task_arithmetic" else {}
        merge_to(base, vectors, [1.0] * len(vectors), method=op, scale=SCALE, params=params, output=out, **on)
    elif op == "verify":
        from mlflow_taskvec.mlflow.verify import verify

        verify(os.environ["BENCH_VERIFY_URI"])
    elif op in ("compose", "compose_copy", "compose_register", "compose_register_server"):
        from mlflow_taskvec.compose import compose_to
        from mlflow_taskvec.recipe import parse_recipe

        base_dir = hf_folder(Path(base))  # an architecture to register the composite with
        recipe = parse_recipe({"base": str(base_dir), "scale": SCALE, "vectors": [{"finetuned": ft} for ft in fts],
                               **({"device": device} if device else {})}, "bench recipe")
        if op == "compose":
            remove(Path(out).with_suffix(""))
            compose_to(recipe, output=Path(out).with_suffix(""))
        elif op == "compose_copy":
            folder, copy = Path(out).with_suffix(""), Path(out).with_suffix(".copy")
            remove(folder)
            remove(copy)
            compose_to(recipe, output=folder)
            shutil.copytree(folder, copy)
        else:
            from mlflow_taskvec.mlflow.registry import register_composite

            return register_composite(recipe, "bench-composite")
    elif op in METHOD_PARAMS:
        vectors = [TaskVector.extract(base, ft) for ft in fts[: 2 if op == "slerp" else 3]]
        merge_to(base, vectors, [1.0] * len(vectors), method=METHOD_OF.get(op, op), scale=SCALE, params=METHOD_PARAMS[op], output=out, **on)
    elif op == "svd_floor":
        from mlflow_taskvec.engine.streaming import one_torch_thread

        inputs = [open_checkpoint(p) for p in [base] + fts]
        specs = inputs[0].specs()
        with one_torch_thread():  # as the engine computes
            for name in sorted(specs):
                if len(specs[name].shape) == 2:
                    b = inputs[0].get_tensor(name)
                    for ft in inputs[1:]:
                        torch.linalg.svd(ft.get_tensor(name).float() - b.float(), full_matrices=False)  # as the engine: in float32
    elif op in ("floor2", "floor3", "floor4"):
        inputs = [open_checkpoint(p) for p in [base] + fts[: int(op[-1]) - 1]]
        specs = inputs[0].specs()
        writer = StreamingWriter(out, specs)
        for name in writer.order:
            flats = [c.get_tensor(name).reshape(-1) for c in inputs]
            for start, stop in chunk_ranges(specs[name].numel):
                copies = [f[start:stop].clone() for f in flats]
                writer.write(name, copies[0])
        writer.close()
    elif op in ("naive_task_arithmetic", "naive_ties"):
        from safetensors.torch import load_file, save_file

        # As the reference code does: each task vector from a fresh load of base and fine-tune.
        tvs = []
        for ft in fts:
            b, f = load_file(base), load_file(ft)
            tvs.append({k: f[k] - b[k] for k in b})
            del b, f
        b = load_file(base)
        if op == "naive_task_arithmetic":
            total = tvs[0]
            for tv in tvs[1:]:
                total = {k: total[k] + tv[k] for k in total}
            merged = {k: b[k] + SCALE * total[k] for k in b}
        else:
            w = torch.ones(len(tvs), 1)
            merged = {}
            for k in b:
                stacked = torch.stack([tv[k].reshape(-1) for tv in tvs])
                numel = stacked.shape[1]
                keep = max(1, int(density * numel))
                mag = stacked.abs()
                thr = mag.kthvalue(numel - keep + 1, dim=1, keepdim=True).values
                # Exactly `keep` entries per input, as the engine does: those above the
                # threshold, then the first ones equal to it in flattened order.
                above, tied = mag > thr, mag == thr
                need = keep - above.sum(1, keepdim=True)
                kept = above | (tied & (tied.cumsum(1) <= need))
                scaled = torch.where(kept, stacked, 0.0) * w
                elected = torch.where(scaled.sum(0) >= 0, 1.0, -1.0)
                agree = torch.sign(scaled) == elected
                num = torch.where(agree, scaled, 0.0).sum(0)
                div = (agree * w).sum(0)
                div = torch.where(div == 0, 1.0, div)
                merged[k] = (b[k].reshape(-1) + SCALE * (num / div)).reshape(b[k].shape)
        save_file(merged, out)
        _fsync(Path(out))
    else:
        raise SystemExit(f"unknown op {op!r}")


def register_bench_composite(base: str, fts: list[str], device: str | None) -> str:
    """Register the compose ops' composite (as ``compose_register`` does); returns its version's URI."""
    from mlflow_taskvec.mlflow.registry import register_composite
    from mlflow_taskvec.recipe import parse_recipe

    recipe = parse_recipe({"base": str(hf_folder(Path(base))), "scale": SCALE, "vectors": [{"finetuned": ft} for ft in fts],
                           **({"device": device} if device else {})}, "bench recipe")
    return register_composite(recipe, "bench-verify").version_uri


def hf_folder(checkpoint: Path) -> Path:
    """A generated checkpoint as an HF-style folder: a link to its weights beside a Llama config.json
    (an LLM shape's checkpoints are such folders already)."""
    from mlflow_taskvec.engine import open_checkpoint

    if checkpoint.is_dir():
        return checkpoint
    folder = checkpoint.with_suffix("")
    folder.mkdir(exist_ok=True)
    if not (folder / "model.safetensors").exists():
        (folder / "model.safetensors").symlink_to(checkpoint.resolve())
    plan = plan_model(float(open_checkpoint(checkpoint).metadata()["bench.size_gb"]))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": plan["hidden"],
              "intermediate_size": plan["intermediate"], "num_hidden_layers": plan["layers"],
              "num_attention_heads": plan["hidden"] // 64, "num_key_value_heads": plan["hidden"] // 64,
              "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def child_main(args: argparse.Namespace) -> None:
    import resource

    import torch

    import mlflow_taskvec.engine  # noqa: F401  (imported before the baseline)
    from safetensors.torch import load_file  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.add(torch.ones(8), torch.ones(8))  # lazy torch initialisation, before the baseline
    if args.child in MLFLOW_OPS:
        if args.child in SERVER_OPS:  # the team server the parent started
            os.environ["MLFLOW_TRACKING_URI"] = os.environ["BENCH_SERVER_URI"]
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(args.out).parent / 'mlflow.db'}")
        os.environ.setdefault("MLFLOW_TASKVEC_CACHE", str(Path(args.out).parent / "download-cache"))
        import mlflow_taskvec.mlflow.registry  # noqa: F401  (MLflow's import is not what is measured)
        import mlflow_taskvec.mlflow.verify  # noqa: F401
    if args.child == "verify":  # the composite to verify, registered before the clock starts
        os.environ["BENCH_VERIFY_URI"] = register_bench_composite(args.base, args.ft, args.device)
    profiler = None
    if args.profile_out:
        import cProfile

        profiler = cProfile.Profile()
    baseline = read_anon_kb()
    sampler = AnonSampler()
    sampler.start()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    registered = run_op(args.child, args.base, args.ft, args.out, args.density, args.device)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    end = read_anon_kb()
    sampler.stop()
    if profiler:
        profiler.dump_stats(args.profile_out)
    held = {}
    if args.child in SERVER_OPS:  # what the server holds, asked after the clock stopped
        import mlflow

        version = mlflow.MlflowClient().get_model_version(registered.name, registered.version)
        held = {"registered": registered.version_uri, "status": version.status,
                "artifact_location": mlflow.get_logged_model(registered.model_id).artifact_location}
    print(json.dumps({**held,
        "op": args.child,
        "wall_s": wall,
        "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "baseline_mb": baseline / 1024,
        "peak_anon_mb": (max(sampler.peak_kb, end) - baseline) / 1024,
        "samples": sampler.samples,
    }))


# -- the team server (compose_register_server) ----------------------------------------


class ServerUnavailable(RuntimeError):
    """No PostgreSQL to put a team server on: the op is skipped, not failed."""


class TeamServer:
    """``mlflow server`` on a fresh PostgreSQL database of ``pg`` (``USER@HOST:PORT``, trust
    auth), artifacts proxied into ``root/artifacts``, on a free 127.0.0.1 port; a context
    manager that stops the server (its whole process group) and drops the database."""

    def __init__(self, root: Path, pg: str):
        self.root, self.artifacts = root, root / "artifacts"
        user, _, where = pg.rpartition("@")
        host, _, port = where.partition(":")
        self.pg = {"user": user or "postgres", "host": host or "127.0.0.1", "port": int(port or 5432)}
        self.database = f"taskvec_bench_{os.getpid()}_{int(time.time())}"
        self.proc: subprocess.Popen | None = None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def _sql(self, statement: str) -> None:
        try:
            import psycopg2
        except ImportError as exc:
            raise ServerUnavailable(f"psycopg2 is not importable ({exc})") from None
        try:
            conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **self.pg)
        except psycopg2.OperationalError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ServerUnavailable(f"PostgreSQL is not reachable at {self.pg['user']}@{self.pg['host']}:{self.pg['port']}: {first}") from None
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def __enter__(self) -> "TeamServer":
        import requests

        self._sql(f'CREATE DATABASE "{self.database}"')
        backend = f"postgresql+psycopg2://{self.pg['user']}@{self.pg['host']}:{self.pg['port']}/{self.database}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
               "--artifacts-destination", str(self.artifacts), "--default-artifact-root", "mlflow-artifacts:/",
               "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "2"]
        # no MLflow settings of ours; no background job runner (it competes for the CPUs)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / "server.log", "ab") as log:
                self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 180
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "server.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"mlflow server did not come up (exit {self.proc.poll()}):\n{tail}")
                try:
                    if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.3)
        except BaseException:
            self.__exit__()
            raise
        print(f"  team server: {self.url} (mlflow server, PostgreSQL database {self.database}, artifacts proxied into {self.artifacts})")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.artifacts, ignore_errors=True)  # a composite per run
        self._sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server's process group and PostgreSQL's processes
        (with their reaped children): the op's work on the server's side, not noise."""
        tick, total = os.sysconf("SC_CLK_TCK"), 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    head, _, rest = f.read().rpartition(")")
            except OSError:  # gone meanwhile
                continue
            fields = rest.split()
            if int(fields[2]) == self.proc.pid or head.endswith("(postgres"):
                total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        return total / tick

    def artifact_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.artifacts.rglob("*") if f.is_file())


# -- the parent ----------------------------------------------------------------------


def system_busy_s() -> float:
    """CPU seconds all processes (and steal) have used since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float) -> None:
    """Wait (at most ``limit_s``) until the CPUs are less than 10% busy over one second."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        b0, t0 = system_busy_s(), time.monotonic()
        time.sleep(1.0)
        if (system_busy_s() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1)) < 0.1:
            return


def run_child(op: str, paths: list[Path], out: Path, args: argparse.Namespace, profile_out: Path | None = None,
              server: TeamServer | None = None) -> dict:
    """Run ``op`` in a fresh process; ``server``: the team server it works against (its CPU counts as the op's)."""
    import resource

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", op, "--base", str(paths[0]),
           "--ft", *map(str, paths[1:]), "--out", str(out), "--density", str(args.density)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.device:
        cmd += ["--device", args.device]
    if profile_out:
        cmd += ["--profile-out", str(profile_out)]
    env = {**os.environ, "BENCH_SERVER_URI": server.url} if server else None
    served0 = server.cpu_s() if server else 0.0
    busy0, ru0, t0 = system_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, env=env)  # an MLflow store goes beside the checkpoints
    busy1, ru1, t1 = system_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if server:
        res["server_cpu_s"] = server.cpu_s() - served0
    # CPU that other processes used while the child ran, as a share of the machine: noise.
    ours = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) + res.get("server_cpu_s", 0.0)
    res["others_share"] = max(0.0, (busy1 - busy0) - ours) / ((t1 - t0) * (os.cpu_count() or 1))
    return res


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def max_abs_diff(a: Path, b: Path) -> float:
    """The largest ``|a - b|`` over every entry of two checkpoints, computed in float32."""
    from mlflow_taskvec.engine import open_checkpoint
    from mlflow_taskvec.engine.streaming import chunk_ranges

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert sorted(ca.keys()) == sorted(cb.keys()), "outputs hold different tensors"
    worst = 0.0
    for name in ca.keys():
        ta, tb = ca.get_tensor(name).reshape(-1), cb.get_tensor(name).reshape(-1)
        for s, e in chunk_ranges(ta.numel()):
            worst = max(worst, float((ta[s:e].float() - tb[s:e].float()).abs().max()))
    return worst


def measure(op: str, paths: list[Path], out: Path, args: argparse.Namespace, profile: Path, server: TeamServer | None = None) -> list[dict]:
    """The timed runs of ``op`` (after its warm-up run, which ``--profile`` profiles), each in a fresh process."""
    runs = []
    for i in range((1 if args.warm else 0) + args.repeat):
        timed = not args.warm or i > 0
        prof = profile if (op in args.profile and i == 0) else None
        for attempt in range(1 + (args.retries if timed else 0)):
            if timed:
                wait_quiet(args.quiet_wait)
            remove(out)
            res = run_child(op, paths, out, args, prof, server)
            if res["others_share"] <= args.max_noise:
                break
            if timed and attempt < args.retries:
                print(f"  {op}: other processes used {100 * res['others_share']:.0f}% of the CPUs, running it again")
        if prof:
            print_profile(op, prof, res)
        elif timed:
            runs.append(res)
    return runs


def check_served(op: str, runs: list[dict], server: TeamServer, composite_bytes: int) -> None:
    """Each timed run's version READY on the server, its model's artifacts behind the server's
    proxy (``mlflow-artifacts:``), and the composite's bytes in the proxied folder."""
    for r in runs:
        if r["status"] != "READY" or not r["artifact_location"].startswith("mlflow-artifacts:"):
            raise RuntimeError(f"{op}: {r['registered']} is {r['status']} at {r['artifact_location']} (expected READY, mlflow-artifacts:)")
    stored = server.artifact_bytes()
    if stored < composite_bytes:
        raise RuntimeError(f"{op}: the proxied artifact store holds {stored} bytes, less than one composite ({composite_bytes})")
    print(f"  check: {op}: {', '.join(r['registered'] for r in runs)} READY on {server.url}, logged under mlflow-artifacts:/, "
          f"{stored / GB:.3g} GB in the proxied artifact store")


def bench_size(size_gb: "float | str", args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Every op on one model: a size in GB (fp32 single files) or an LLM shape's name (bf16, HF-sharded)."""
    plan = plan_for(size_gb)
    largest = plan["largest"]
    dtype = plan.get("dtype", "float32")
    width = 2 if dtype == "bfloat16" else 4
    layout = f"{dtype}, HF-sharded ({SHARD_OF.get(size_gb, LLM_SHARD)} shards + index)" if isinstance(size_gb, str) else dtype
    print(f"\n== {model_label(size_gb)}: hidden {plan['hidden']}, intermediate {plan['intermediate']}, {plan['layers']} layers, "
          f"{plan['params'] / 1e6:.1f}M parameters ({plan['bytes'] / GB:.2f} GB {layout} per checkpoint), "
          f"largest tensor {largest} {list(plan['shapes'][largest])} "
          f"({math.prod(plan['shapes'][largest]) * width / 2**20:.0f} MiB)")
    directory = workdir / (f"model-{size_gb}" if isinstance(size_gb, str) else f"model-{size_gb:g}gb")
    paths = generate_model(directory, size_gb, args.seed)
    rows = []
    outputs: dict[str, Path] = {}
    for op in args.ops:
        out = directory / f"out-{op}.safetensors"
        if op in NAIVE_MEMORY_FACTOR and isinstance(size_gb, str):  # load_file reads one file, not a sharded folder
            rows.append({"op": op, "size_gb": size_gb, "skipped": "single-file checkpoints only"})
            continue
        if op in NAIVE_MEMORY_FACTOR:
            need = NAIVE_MEMORY_FACTOR[op] * plan["bytes"]
            if need > 0.9 * mem_available():
                print(f"  {op}: skipped (needs ~{need / GB:.1f} GB, {mem_available() / GB:.1f} GB available)")
                rows.append({"op": op, "size_gb": size_gb, "skipped": f"needs ~{need / GB:.0f} GB RAM"})
                continue
        profile = workdir / f"{op}-{model_label(size_gb).replace(' ', '')}.prof"
        if op in SERVER_OPS:
            try:
                with TeamServer(directory / "team-server", args.pg) as server:
                    runs = measure(op, paths, out, args, profile, server)
                    check_served(op, runs, server, plan["bytes"])
            except ServerUnavailable as exc:
                print(f"  {op}: skipped ({exc})")
                rows.append({"op": op, "size_gb": size_gb, "skipped": f"no team server: {exc}"})
                continue
        else:
            runs = measure(op, paths, out, args, profile)
        outputs[op] = out
        row = {"op": op, "size_gb": size_gb,
               "wall_s": min(r["wall_s"] for r in runs),
               "cpu_s": min(r["cpu_s"] for r in runs),
               "peak_anon_mb": max(r["peak_anon_mb"] for r in runs),
               "others_share": max(r["others_share"] for r in runs),
               "baseline_mb": runs[0]["baseline_mb"],
               **({"server_cpu_s": min(r["server_cpu_s"] for r in runs)} if op in SERVER_OPS else {})}
        rows.append(row)
        served = f"  server cpu {row['server_cpu_s']:6.2f} s" if op in SERVER_OPS else ""
        print(f"  {op:<22} {row['wall_s']:7.2f} s  cpu {row['cpu_s']:6.2f} s{served}  peak anon {row['peak_anon_mb']:8.1f} MB"
              f"  (other processes used {100 * row['others_share']:.0f}% of the CPUs meanwhile)")
    by_op = {r["op"]: r for r in rows}
    for r in rows:
        floor = by_op.get(FLOOR_OF.get(r["op"], ""))
        if "wall_s" in r and floor and "wall_s" in floor:
            r["ratio"] = r["wall_s"] / floor["wall_s"]
        r["target"], r["result"] = judge(r)
    for eng, naive in CHECK_PAIRS:
        if eng in outputs and naive in outputs and outputs[eng].exists() and outputs[naive].exists():
            d = max_abs_diff(outputs[eng], outputs[naive])
            print(f"  check: {eng} vs {naive}: max |diff| = {d:.3g}")
    for out in outputs.values():
        for path in (out, out.with_suffix(""), out.with_suffix(".copy")):  # the compose ops write folders
            remove(path)
    for r in rows:  # what the measured SVD work is: SVDs per input and m x n of the largest
        if r["op"] == "svd_floor":
            matrices = [s for s in plan["shapes"].values() if len(s) == 2]
            print(f"  svd_floor: {len(matrices)} matrices x {N_FINETUNES} inputs, largest {list(max(matrices, key=math.prod))}")
    if not args.keep:
        remove(directory)
    return rows


def judge(row: dict) -> tuple[str, str]:
    if row["op"] not in TARGETS or "wall_s" not in row:
        return "-", "-"
    max_ratio, max_mb = TARGETS[row["op"]]
    parts, misses = [], []
    if max_ratio is not None:
        parts.append(f"<={max_ratio:g}x")
        if row.get("ratio") is None or row["ratio"] > max_ratio:
            misses.append("time")
    if max_mb is not None:
        parts.append(f"<{max_mb} MB")
        if row["peak_anon_mb"] >= max_mb:
            misses.append("memory")
    return ", ".join(parts), ("MISS (" + ", ".join(misses) + ")") if misses else "PASS"


def print_profile(op: str, prof: Path, res: dict, top: int = 18) -> None:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    body = text[text.find("   ncalls"):] if "   ncalls" in text else text
    print(f"\n  -- cProfile of {op} (main thread only; {res['wall_s']:.2f} s under the profiler), top {top} by tottime --")
    for line in body.rstrip().splitlines():
        print("  " + line)
    print()


def engine_version() -> str:
    """The git commit of the package, and whether its engine has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mlflow_taskvec/engine"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (sha or "unknown") + (" + uncommitted engine changes" if dirty else "")


def machine_info() -> dict:
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    try:
        import safetensors

        st = safetensors.__version__
    except Exception:
        st = "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "gpu": gpu, "cores": len(os.sched_getaffinity(0)), "ram_gb": mem / 2**30,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "safetensors": st}


def fmt_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["op"], model_label(r["size_gb"]), "-", "-", "-", "-", "-", "skipped: " + r["skipped"]])
            continue
        is_floor = r["op"].startswith("floor") or r["op"] in FLOOR_OF.values()
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ("1.00x" if is_floor else "-")
        out.append([r["op"], model_label(r["size_gb"]), f"{r['wall_s']:.2f}", ratio, f"{r['cpu_s']:.2f}",
                    f"{r['peak_anon_mb']:.0f}", r["target"], r["result"]])
    return out


HEADER = ["op", "size", "wall s", "x floor", "cpu s", "peak anon MB", "target", "result"]


def print_table(rows: list[dict], markdown: bool) -> None:
    body = fmt_rows(rows)
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" if i < 6 else "---" for i in range(len(HEADER))) + "|")
        for line in body:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    print("  ".join("-" * w for w in widths))
    for line in body:
        print("  ".join(c.ljust(w) if i in (0, 1, 6, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=0.5, help="fp32 size of each checkpoint, in GB (1e9 bytes)")
    p.add_argument("--sizes", type=float, nargs="*", help="several sizes in one run (overrides --size-gb; none: only --shapes)")
    p.add_argument("--shapes", nargs="+", choices=sorted(LLM_SHAPES), default=[],
                   help="also (after the sizes) real LLM shapes in bf16, HF-sharded: tinyllama-1.1b (4 x 2.2 GB), llama-7b (4 x 13.5 GB); "
                        "tiny-llama (4 x 4 MB, 1 MB shards) checks the benchmark itself")
    p.add_argument("--workdir", type=Path, help="where checkpoints go (default: a temp dir under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints (and the temp dir)")
    p.add_argument("--density", type=float, default=0.2, help="ties density")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per op (best wall time, worst memory)")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="run each op once untimed first, so the inputs are in the page cache")
    p.add_argument("--ops", nargs="+", choices=OPS, default=OPS, help="which ops to run")
    p.add_argument("--profile", nargs="*", choices=OPS, default=[],
                   help="also print a cProfile of these ops (replaces their warm-up run)")
    p.add_argument("--quiet-wait", type=float, default=30, metavar="S",
                   help="before each timed run, wait up to S seconds for the CPUs to be idle (shared machines)")
    p.add_argument("--max-noise", type=float, default=0.1, metavar="F",
                   help="rerun a timed run when other processes used more than this share of the CPUs during it")
    p.add_argument("--retries", type=int, default=1, help="at most this many reruns of a noisy timed run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg", default="postgres@127.0.0.1:5432", metavar="USER@HOST:PORT",
                   help="the PostgreSQL (trust auth) that compose_register_server's team server creates its database on")
    p.add_argument("--threads", type=int, help="torch intra-op threads in the measured process (default: torch's)")
    p.add_argument("--device", help="compute the engine's ops on this device (cpu, cuda, cuda:N; default: the streaming executor)")
    p.add_argument("--markdown", action="store_true", help="print a README-ready markdown table")
    p.add_argument("--json", type=Path, help="also write the rows and the machine to this JSON file")
    # internal: one measured operation in a fresh process
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--ft", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.profile and not args.warm:
        p.error("--profile replaces the warm-up run; it needs --warm")
    sizes = [*(args.sizes if args.sizes is not None else ([] if args.shapes else [args.size_gb])), *args.shapes]
    ops = [op for op in OPS if op in args.ops]
    for op in ops:  # a ratio needs its floor
        if FLOOR_OF.get(op) and FLOOR_OF[op] not in ops:
            ops.insert(0, FLOOR_OF[op])
    args.ops = [op for op in OPS if op in ops]

    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="taskvec-bench-", dir="/tmp")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    machine = (f"{info['cpu']}, {info['cores']} cores, {info['ram_gb']:.0f} GiB RAM; torch {info['torch']} "
               f"({args.threads or info['torch_threads']} threads), safetensors {info['safetensors']}, Python {info['python']}"
               + (f"; device {args.device}" + (f" ({info['gpu']})" if info["gpu"] and args.device.startswith("cuda") else "") if args.device else ""))
    cache = ("warm page cache: each op ran once untimed before timing" if args.warm
             else "no warm-up run: inputs are in the page cache only if something read them before")
    print(f"machine: {machine}")
    print(f"engine: git {engine_version()}")
    print(f"workdir: {workdir}; {cache}; {args.repeat} timed run(s) per op, each in a fresh process")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before starting: other processes may skew the timings")
    started = time.perf_counter()
    rows = []
    try:
        for size in sizes:
            rows += bench_size(size, args, workdir)
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmachine: {machine}; engine: git {engine_version()}")
    print(f"{cache}; wall s: best of {args.repeat}; peak anon MB: RssAnon above the post-import baseline, worst of "
          f"{args.repeat}; x floor: extract vs floor2 (read 2 inputs, write 1), merges vs floor4 (read 4, write 1); "
          f"slerp vs floor3 (read 3, write 1), the SVD methods vs svd_floor (one torch.linalg.svd per matrix per input), "
          f"compose_register(_server) vs compose_copy (cpu s: the client's; the team server's own in the JSON), verify vs compose; "
          f"ties density {args.density:g}, the later methods' parameters {json.dumps(METHOD_PARAMS)}, 3 fine-tunes (slerp 2), "
          f"scale {SCALE:g}\n")
    print_table(rows, args.markdown)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "engine": engine_version(), "rows": rows}, indent=2))
    noisy = [f"{r['op']} @ {model_label(r['size_gb'])} ({100 * r['others_share']:.0f}%)" for r in rows if r.get("others_share", 0) > args.max_noise]
    if noisy:
        print(f"\nnoisy: other processes used over {100 * args.max_noise:.0f}% of the CPUs during: " + ", ".join(noisy))
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
