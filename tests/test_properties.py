"""Property tests: algebra round trips, apply_to reproducing the fine-tune, and
merges (DARE above all) that do not depend on tensor order or file layout."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mlflow_taskvec.engine import TaskVector, merge, merge_to, open_checkpoint
from mlflow_taskvec.engine.methods.trim import trim_threshold

SETTINGS = settings(max_examples=25, deadline=None)
FILE_SETTINGS = settings(max_examples=12, deadline=None)

shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)
layouts = st.dictionaries(st.from_regex(r"[a-z]{1,3}(\.[a-z]{1,3}){0,2}", fullmatch=True), shapes, min_size=1, max_size=5)


def random_state(layout: dict, seed: int, scale: float = 1.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (scale * torch.randn(shape, generator=g)).to(dtype) for name, shape in sorted(layout.items())}


def perturbed(state: dict, seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in state.items()}


def reordered(state: dict, order: list[str]) -> dict[str, torch.Tensor]:
    return {name: state[name] for name in order}


def load_output(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        out.update(load_file(str(f)))
    return out


def write_sharded(directory: Path, state: dict, num_shards: int) -> Path:
    """An HF-style sharded directory written with safetensors itself."""
    directory.mkdir()
    names = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        group = names[i::num_shards]
        if group:
            save_file({n: state[n] for n in group}, str(directory / shard))
            weight_map.update({n: shard for n in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


# -- algebra -------------------------------------------------------------------------


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), factor=st.floats(-4, 4, allow_nan=False).filter(lambda x: abs(x) > 1e-3))
def test_adding_then_subtracting_a_vector_gives_back_the_first(layout, seed, factor):
    base = random_state(layout, seed)
    a = TaskVector.extract(base, perturbed(base, seed + 1, 0.1))
    b = TaskVector.extract(base, perturbed(base, seed + 2, 3.0))
    round_trip = (a * factor + b) - b
    for name in a.names:
        torch.testing.assert_close(round_trip.get_tensor(name), factor * a.get_tensor(name), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16))
def test_sum_of_a_vector_and_its_negation_is_zero(layout, seed):
    base = random_state(layout, seed)
    a = TaskVector.extract(base, perturbed(base, seed + 1, 0.5))
    assert (a + (-a)).norm() == 0.0
    assert (a - a).norm() == 0.0


# -- apply_to reproduces the fine-tune -------------------------------------------------


magnitudes = st.sampled_from([1e-3, 1.0, 1e3])


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), base_scale=magnitudes, delta_scale=magnitudes)
def test_apply_to_with_scale_one_reproduces_an_fp32_finetune(layout, seed, base_scale, delta_scale):
    base = random_state(layout, seed, base_scale)
    ft = perturbed(base, seed + 1, delta_scale)
    merged = TaskVector.extract(base, ft).apply_to(base, 1.0)
    eps = torch.finfo(torch.float32).eps
    for name in base:
        bound = eps * (base[name].abs() + ft[name].abs())  # two roundings: (ft - base), then base + delta
        assert bool(((merged[name] - ft[name]).abs() <= bound).all()), name


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), base_scale=magnitudes, delta_scale=st.sampled_from([1e-2, 1.0]))
def test_apply_to_with_scale_one_reproduces_a_bf16_finetune(layout, seed, base_scale, delta_scale):
    base = random_state(layout, seed, base_scale, torch.bfloat16)
    ft = perturbed(base, seed + 1, delta_scale * base_scale)
    merged = TaskVector.extract(base, ft).apply_to(base, 1.0)
    for name in base:
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name], ft[name])


@FILE_SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_a_saved_and_reloaded_vector_applies_like_the_extracted_one(layout, seed, dtype):
    base = random_state(layout, seed, 1.0, dtype)
    vector = TaskVector.extract(base, perturbed(base, seed + 1, 0.05))
    with tempfile.TemporaryDirectory() as tmp:
        vector.save(Path(tmp) / "v.safetensors")
        loaded = TaskVector.load(Path(tmp) / "v.safetensors")
        direct, via_file = vector.apply_to(base, 0.7), loaded.apply_to(base, 0.7)
    for name in base:
        assert torch.equal(direct[name], via_file[name]), name


# -- independence from order and layout ------------------------------------------------


methods = st.sampled_from(
    [
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.3}),
        ("ties", {"density": 0.4}),
        ("magnitude_prune", {"density": 0.6}),
    ]
)


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), method=methods, data=st.data())
def test_merge_does_not_depend_on_the_insertion_order_of_tensors(layout, seed, method, data):
    name, params = method
    params = {**params, "seed": seed} if name.startswith("dare") else params
    base = random_state(layout, seed)
    fts = [perturbed(base, seed + i + 1, 0.1) for i in range(2)]
    order = data.draw(st.permutations(sorted(base)), label="order")
    shuffled_base = reordered(base, order)
    shuffled_fts = [reordered(ft, list(reversed(order))) for ft in fts]
    first = merge(base, [TaskVector.extract(base, ft) for ft in fts], [1.0, 0.5], method=name, params=params)
    second = merge(
        shuffled_base, [TaskVector.extract(shuffled_base, ft) for ft in shuffled_fts], [1.0, 0.5], method=name, params=params
    )
    for n in base:
        assert torch.equal(first[n], second[n]), n


@FILE_SETTINGS
@given(
    layout=layouts,
    seed=st.integers(0, 2**16),
    method=methods,
    base_shards=st.integers(2, 4),
    max_shard_size=st.sampled_from([16, 64, 200, 10_000]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_sharded_and_single_file_inputs_and_outputs_give_identical_merges(layout, seed, method, base_shards, max_shard_size, dtype):
    name, params = method
    params = {**params, "seed": seed} if name.startswith("dare") else params
    base = random_state(layout, seed, 1.0, dtype)
    fts = [perturbed(base, seed + i + 1, 0.1) for i in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file(base, str(tmp / "base.safetensors"))
        sharded_base = write_sharded(tmp / "sharded_base", base, base_shards)
        for i, ft in enumerate(fts):
            save_file(ft, str(tmp / f"ft{i}.safetensors"))
        vectors = [TaskVector.extract(tmp / "base.safetensors", tmp / f"ft{i}.safetensors") for i in range(2)]
        single = merge_to(tmp / "base.safetensors", vectors, [0.8, 1.1], method=name, params=params, output=tmp / "single.safetensors")
        sharded = merge_to(sharded_base, vectors, [0.8, 1.1], method=name, params=params, output=tmp / "sharded", max_shard_size=max_shard_size)
        in_memory = merge(base, vectors, [0.8, 1.1], method=name, params=params)
        a, b = load_output(tmp / "single.safetensors"), load_output(tmp / "sharded")
        assert single.fingerprint == sharded.fingerprint == open_checkpoint(tmp / "sharded").fingerprint()
    assert sorted(a) == sorted(b) == sorted(in_memory)
    for n in a:
        assert a[n].dtype == dtype
        assert torch.equal(a[n], b[n]) and torch.equal(a[n], in_memory[n]), n


# -- the exact magnitude threshold ----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.one_of(
        st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=150).map(lambda v: torch.tensor(v, dtype=torch.float32)),
        st.lists(st.floats(allow_nan=False), min_size=1, max_size=150).map(lambda v: torch.tensor(v, dtype=torch.float64)),
    ),
    chunk=st.integers(3, 64),
    data=st.data(),
)
def test_trim_threshold_is_the_kth_of_topk(values, chunk, data):
    k = data.draw(st.integers(1, values.numel()), label="k")
    chunks = lambda: (values[i : i + chunk] for i in range(0, values.numel(), chunk))  # noqa: E731
    expected = float(torch.topk(values.abs(), k).values[-1])
    assert trim_threshold(chunks, k, values.dtype).value == expected
