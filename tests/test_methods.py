"""Merge methods against straightforward reference implementations, their randomness,
dtypes, the exact magnitude threshold, and refusal of bad merge requests."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlflow_taskvec.engine import TaskVector, merge, merge_to, open_checkpoint
from mlflow_taskvec.engine.checkpoint import StateDictCheckpoint
from mlflow_taskvec.engine.methods import METHODS, MergeContext
from mlflow_taskvec.engine.methods.trim import trim_threshold
from mlflow_taskvec.engine.streaming import RANDOM_BLOCK, derive_seed
from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS
from mlflow_taskvec.errors import TaskVecError

# -- reference implementations (whole tensors, plain loops) ---------------------------


def ref_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) entries of largest magnitude; among entries
    tied with the k-th, the first in flattened order (a stable sort keeps that order)."""
    flat = t.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = True
    return torch.where(keep, flat, 0.0).reshape(t.shape)


def ref_keep_mask(seed: int, input_index: int, name: str, numel: int, p: float) -> torch.Tensor:
    """The DARE keep mask, rebuilt as methods.py documents it: one generator per block
    of RANDOM_BLOCK entries, seeded by derive_seed(seed, input index, tensor name, block)."""
    parts = []
    for block in range(math.ceil(numel / RANDOM_BLOCK)):
        length = min(RANDOM_BLOCK, numel - block * RANDOM_BLOCK)
        gen = torch.Generator().manual_seed(derive_seed(seed, input_index, name, block))
        parts.append(torch.rand(length, generator=gen) < p)
    return torch.cat(parts)


def ref_drop(t: torch.Tensor, seed: int, input_index: int, name: str, p: float) -> torch.Tensor:
    keep = ref_keep_mask(seed, input_index, name, t.numel(), p).reshape(t.shape)
    return torch.where(keep, t / p, 0.0)


def ref_weighted_sum(ts, weights):
    out = torch.zeros_like(ts[0])
    for t, w in zip(ts, weights):
        out = out + w * t
    return out


def ref_elect_and_mean(ds, weights):
    """TIES: elected sign s = +1 where sum d_i >= 0 else -1; the agreeing d_i summed and divided
    by the sum of their |w_i| (so a negative weight still negates; equal to w_i for positive weights)."""
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    numerator = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for d, w in zip(ds, weights):
        agree = torch.sign(d) == elected
        numerator = numerator + torch.where(agree, d, 0.0)
        divisor = divisor + agree.to(total.dtype) * abs(w)
    return numerator / torch.where(divisor == 0, 1.0, divisor)


def reference_merge(base_sd, finetune_sds, weights, method, scale=1.0, params=None, compute=torch.float32):
    params = dict(params or {})
    density, seed = params.get("density"), params.get("seed", 0)
    out = {}
    for name, b in base_sd.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        bc = b.to(compute)
        ts = [ft[name].to(compute) - bc for ft in finetune_sds]
        if method == "task_arithmetic":
            merged = ref_weighted_sum(ts, weights)
        elif method == "magnitude_prune":
            merged = ref_weighted_sum([ref_trim(t, density) for t in ts], weights)
        elif method == "ties":
            merged = ref_elect_and_mean([ref_trim(t, density) * w for t, w in zip(ts, weights)], weights)
        elif method == "dare_linear":
            merged = ref_weighted_sum([ref_drop(t, seed, i, name, density) for i, t in enumerate(ts)], weights)
        elif method == "dare_ties":
            dropped = [ref_drop(t, seed, i, name, density) for i, t in enumerate(ts)]
            merged = ref_elect_and_mean([d * w for d, w in zip(dropped, weights)], weights)
        else:
            raise AssertionError(method)
        out[name] = (bc + scale * merged).to(b.dtype)
    return out


def assert_state_close(actual, expected, **tol):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        if expected[name].is_floating_point():
            torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{n}: {m}", **tol)
        else:
            assert torch.equal(actual[name], expected[name]), name


def assert_state_equal(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def load_output(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        out.update(load_file(str(f)))
    return out


ALL_METHODS = [
    pytest.param("task_arithmetic", {}, id="task_arithmetic"),
    pytest.param("ties", {"density": 0.3}, id="ties"),
    pytest.param("magnitude_prune", {"density": 0.3}, id="magnitude_prune"),
    pytest.param("dare_linear", {"density": 0.4, "seed": 7}, id="dare_linear"),
    pytest.param("dare_ties", {"density": 0.4, "seed": 7}, id="dare_ties"),
]
# The later methods, tested against their references in tests/test_methods_sota.py; here in the
# tests that every method must pass.
LATER_METHODS = [
    pytest.param("breadcrumbs", {"density": 0.5, "gamma": 0.1}, id="breadcrumbs"),
    pytest.param("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, id="breadcrumbs_ties"),
    pytest.param("della", {"density": 0.5, "epsilon": 0.2}, id="della"),
    pytest.param("della_linear", {"density": 0.5, "epsilon": 0.2}, id="della_linear"),
    pytest.param("consensus_ta", {}, id="consensus_ta"),
    pytest.param("consensus_ties", {"density": 0.5}, id="consensus_ties"),
    pytest.param("tsv_m", {}, id="tsv_m"),
    pytest.param("iso_c", {}, id="iso_c"),
    pytest.param("iso_cts", {}, id="iso_cts"),
    pytest.param("slerp", {"t": 0.4}, id="slerp"),
]
NON_TRIMMING = [p for p in ALL_METHODS if p.id in ("task_arithmetic", "dare_linear", "dare_ties")]
WEIGHTS = [0.6, 1.3, -0.4]


@pytest.fixture(scope="module")
def fp32_set(tmp_path_factory, model_set_factory):
    return model_set_factory(tmp_path_factory.mktemp("fp32"), torch.float32)


@pytest.fixture(scope="module")
def bf16_set(tmp_path_factory, model_set_factory):
    return model_set_factory(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


@pytest.fixture(scope="module")
def fp16_set(tmp_path_factory, model_set_factory):
    return model_set_factory(tmp_path_factory.mktemp("fp16"), torch.float16)


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    """A base with one tensor larger than a streaming chunk, and two fine-tunes.

    Base values lie in [0.65, 0.85) and each delta is a distinct multiple of 2**-24,
    so ``finetune - base`` is exact in float32 and every delta magnitude is unique:
    the top-k set of the trim step is well defined.
    """
    directory = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(11)
    shape = (2200, 1000)
    numel = shape[0] * shape[1]
    assert numel > CHUNK_ELEMENTS
    base = {
        "big.weight": (0.65 + 0.2 * torch.rand(shape, generator=g)).float(),
        "small.bias": torch.randn(7, generator=g),
        "step": torch.tensor([3], dtype=torch.int64),
    }
    fts = []
    for _ in range(2):
        magnitude = (torch.randperm(numel, generator=g) + 1).double() * 2.0**-24
        sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0).double()
        d = (sign * magnitude).reshape(shape)
        ft = {
            "big.weight": (base["big.weight"].double() + d).float(),
            "small.bias": base["small.bias"] + 0.1 * torch.randn(7, generator=g),
            "step": base["step"].clone(),
        }
        assert torch.equal((ft["big.weight"] - base["big.weight"]).double(), d)
        fts.append(ft)
    save_file(base, str(directory / "base.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        save_file(ft, str(directory / f"ft{i}.safetensors"))
        paths.append(directory / f"ft{i}.safetensors")
    base_sd = load_file(str(directory / "base.safetensors"))
    ft_sds = [load_file(str(p)) for p in paths]
    vectors = [TaskVector.extract(directory / "base.safetensors", p) for p in paths]
    return directory, base_sd, ft_sds, vectors


def extract_all(models):
    return [TaskVector.extract(models.base, ft) for ft in models.finetunes]


# -- each method against its reference ------------------------------------------------


@pytest.mark.parametrize("method, params", ALL_METHODS)
def test_method_matches_reference_on_fp32_checkpoints(fp32_set, out_dir, method, params):
    output = out_dir / "merged.safetensors"
    merge_to(fp32_set.base, extract_all(fp32_set), WEIGHTS, method=method, scale=0.8, params=params, output=output)
    base_sd = load_file(str(fp32_set.base))
    expected = reference_merge(base_sd, [load_file(str(p)) for p in fp32_set.finetunes], WEIGHTS, method, 0.8, params)
    assert_state_close(load_file(str(output)), expected)


@pytest.mark.parametrize("method, params", NON_TRIMMING)
def test_method_matches_reference_on_bf16_checkpoints(bf16_set, out_dir, method, params):
    output = out_dir / "merged.safetensors"
    merge_to(bf16_set.base, extract_all(bf16_set), WEIGHTS, method=method, scale=0.8, params=params, output=output)
    base_sd = load_file(str(bf16_set.base))
    expected = reference_merge(base_sd, [load_file(str(p)) for p in bf16_set.finetunes], WEIGHTS, method, 0.8, params)
    merged = load_file(str(output))
    assert merged["embed.weight"].dtype == torch.bfloat16
    assert_state_close(merged, expected)


def assert_within_one_unit_in_the_last_place(actual: dict, expected: dict) -> None:
    """Same names and dtypes; floating tensors differ by at most one unit in the last place of
    their dtype (float32 compute rounds once more than the float64 reference), others are equal."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        if not want.is_floating_point():
            assert torch.equal(got, want), name
            continue
        ulp = (torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=want.dtype)) - want.abs()).double()
        error = (got.double() - want.double()).abs()
        assert bool((error <= ulp).all()), f"{name}: {int((error > ulp).sum())} entries off by more than one ulp"


# Exactly representable weights: products with half-precision deltas are then exact in float32
# too, so an entry whose weighted deltas cancel exactly elects the same sign in both computes
# (with 0.6 and -0.4, 0.6 * 0.046875 - 0.4 * 0.0703125 is >= 0 in float32 and < 0 in float64).
EXACT_WEIGHTS = [0.625, 1.25, -0.375]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method, params", ALL_METHODS)
def test_method_output_in_half_precision_is_the_float64_reference_cast_to_that_dtype(bf16_set, fp16_set, out_dir, method, params, dtype):
    models = bf16_set if dtype == torch.bfloat16 else fp16_set
    output = out_dir / "merged.safetensors"
    merge_to(models.base, extract_all(models), EXACT_WEIGHTS, method=method, scale=0.8, params=params, output=output)
    base_sd = load_file(str(models.base))
    expected = reference_merge(base_sd, [load_file(str(p)) for p in models.finetunes], EXACT_WEIGHTS, method, 0.8, params, compute=torch.float64)
    merged = load_file(str(output))

    assert merged["embed.weight"].dtype == dtype
    assert_within_one_unit_in_the_last_place(merged, expected)


@pytest.mark.parametrize("method, params", ALL_METHODS)
def test_method_matches_reference_on_a_tensor_larger_than_a_chunk(big_set, method, params):
    _, base_sd, ft_sds, vectors = big_set
    result = merge(base_sd, vectors, [0.7, 1.2], method=method, scale=0.9, params=params)
    assert_state_close(result, reference_merge(base_sd, ft_sds, [0.7, 1.2], method, 0.9, params))


def test_ties_matches_float64_reference_on_a_large_tensor_with_float64_compute(big_set):
    _, base_sd, ft_sds, vectors = big_set
    params = {"density": 0.3}
    result = merge(base_sd, vectors, [0.7, 1.2], method="ties", scale=0.9, params=params, compute_dtype="float64")
    expected = reference_merge(base_sd, ft_sds, [0.7, 1.2], "ties", 0.9, params, compute=torch.float64)
    assert_state_close(result, expected)


def test_sharded_inputs_and_outputs_of_a_large_merge_match_the_single_file_merge(big_set, out_dir, hf_dir):
    directory, base_sd, _, vectors = big_set
    params = {"density": 0.5, "seed": 3}
    single = merge_to(directory / "base.safetensors", vectors, [1.0, 0.5], method="dare_ties", params=params, output=out_dir / "single.safetensors")
    sharded_base = hf_dir(directory / "sharded_base", base_sd, num_shards=2)
    vectors[1].save(out_dir / "vec1", max_shard_size="1MB")
    sharded = merge_to(
        sharded_base,
        [vectors[0], TaskVector.load(out_dir / "vec1")],
        [1.0, 0.5],
        method="dare_ties",
        params=params,
        output=out_dir / "sharded",
        max_shard_size="4MB",
    )
    assert len(list((out_dir / "sharded").glob("*.safetensors"))) > 1
    assert_state_equal(load_output(out_dir / "single.safetensors"), load_output(out_dir / "sharded"))
    assert single.fingerprint == sharded.fingerprint == open_checkpoint(out_dir / "sharded").fingerprint()


# -- properties of the methods --------------------------------------------------------


def test_task_arithmetic_is_base_plus_scaled_weighted_sum(fp32_set):
    vectors = extract_all(fp32_set)
    merged = merge(fp32_set.base, vectors, [1.0, 2.0, 0.0], scale=0.5)
    for name in ("embed.weight", "norm.weight"):
        b = fp32_set.base_sd[name]
        expected = b + 0.5 * ((fp32_set.finetune_sds[0][name] - b) + 2.0 * (fp32_set.finetune_sds[1][name] - b))
        torch.testing.assert_close(merged[name], expected)


def test_ties_with_density_one_trims_nothing_and_equals_dare_ties_with_density_one(fp32_set):
    vectors = extract_all(fp32_set)
    ties = merge(fp32_set.base, vectors, WEIGHTS, method="ties", params={"density": 1.0})
    dare_ties = merge(fp32_set.base, vectors, WEIGHTS, method="dare_ties", params={"density": 1.0})
    assert_state_equal(ties, dare_ties)


@pytest.mark.parametrize("method", ["magnitude_prune", "dare_linear"])
def test_density_one_reduces_to_task_arithmetic(fp32_set, method):
    vectors = extract_all(fp32_set)
    plain = merge(fp32_set.base, vectors, WEIGHTS)
    assert_state_close(merge(fp32_set.base, vectors, WEIGHTS, method=method, params={"density": 1.0}), plain)


def test_magnitude_prune_keeps_the_density_fraction_of_each_tensor(big_set):
    _, base_sd, ft_sds, vectors = big_set
    merged = merge(base_sd, vectors[:1], [1.0], method="magnitude_prune", params={"density": 0.25})
    changed = merged["big.weight"] != base_sd["big.weight"]
    assert int(changed.sum()) == int(0.25 * base_sd["big.weight"].numel())
    assert int((merged["small.bias"] != base_sd["small.bias"]).sum()) == max(1, int(0.25 * 7))


def test_ties_sign_election_and_disjoint_mean_on_a_worked_example():
    base = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.0])}, {"w": torch.tensor([3.0, 1.0, -1.0, 0.0])}]
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    merged = merge(base, vectors, [1.0, 1.0], method="ties", params={"density": 1.0})["w"]
    # entry 0: both +, mean 2; entry 1: sum -1 -> elect -, only -2 agrees; entry 2: sum 2 -> +, only 3;
    # entry 3: nothing agrees, divisor counts as 1 -> 0.
    assert torch.equal(merged, torch.tensor([2.0, -2.0, 3.0, 0.0]))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_a_negative_weight_negates_its_vector_under_sign_election(fp32_set, method):
    vector = TaskVector.extract(fp32_set.base, fp32_set.finetunes[0])
    merged = merge(fp32_set.base, [vector], [-0.5], method=method, params={"density": 1.0})
    for name in ("embed.weight", "norm.weight"):
        # the disjoint mean divides by |w|: the magnitude of a lone weight cancels, its sign stays
        b = fp32_set.base_sd[name]
        torch.testing.assert_close(merged[name], b - (fp32_set.finetune_sds[0][name] - b))


def test_trim_keeps_exactly_k_entries_when_magnitudes_tie():
    base = {"w": torch.zeros(1000)}
    ft = {"w": torch.cat([torch.ones(10), torch.full((990,), 0.5)])}
    vector = TaskVector.extract(base, ft)
    merged = merge(base, [vector], [1.0], method="magnitude_prune", params={"density": 0.1})["w"]
    assert int((merged != 0).sum()) == 100


def test_trim_keeps_the_first_tied_entries_across_chunks():
    numel = 2 * CHUNK_ELEMENTS + 5
    ft = torch.full((numel,), 0.5)
    ft[::1000] = 1.0  # a few larger entries, spread over every chunk
    larger = int((ft == 1.0).sum())
    density = 0.6
    k = int(density * numel)
    vector = TaskVector.extract({"w": torch.zeros(numel)}, {"w": ft})

    merged = merge({"w": torch.zeros(numel)}, [vector], [1.0], method="magnitude_prune", params={"density": density})["w"]

    expected = torch.zeros(numel)
    expected[ft == 1.0] = 1.0
    tied_positions = torch.nonzero(ft == 0.5).flatten()[: k - larger]
    expected[tied_positions] = 0.5
    assert torch.equal(merged, expected)
    assert int((merged != 0).sum()) == k


# -- randomness -----------------------------------------------------------------------


DARE = ["dare_linear", "dare_ties"]


@pytest.mark.parametrize("method", DARE)
def test_dare_with_the_same_seed_is_identical(fp32_set, method):
    vectors = extract_all(fp32_set)
    runs = [merge(fp32_set.base, vectors, WEIGHTS, method=method, params={"density": 0.5, "seed": 42}) for _ in range(2)]
    assert_state_equal(*runs)


@pytest.mark.parametrize("method", DARE)
def test_dare_with_a_different_seed_differs(fp32_set, method):
    vectors = extract_all(fp32_set)
    a = merge(fp32_set.base, vectors, WEIGHTS, method=method, params={"density": 0.5, "seed": 1})
    b = merge(fp32_set.base, vectors, WEIGHTS, method=method, params={"density": 0.5, "seed": 2})
    for name in ("embed.weight", "layers.1.mlp.weight"):
        assert not torch.equal(a[name], b[name])


def test_dare_without_a_seed_uses_seed_zero(fp32_set, out_dir):
    vectors = extract_all(fp32_set)
    implicit = merge_to(fp32_set.base, vectors, WEIGHTS, out_dir / "implicit.safetensors", method="dare_linear", params={"density": 0.5})
    explicit = merge(fp32_set.base, vectors, WEIGHTS, method="dare_linear", params={"density": 0.5, "seed": 0})
    assert implicit.params == {"density": 0.5, "seed": 0}
    assert_state_equal(load_file(str(implicit.output)), explicit)


def test_dare_keeps_about_density_of_the_entries_and_rescales_them(big_set):
    _, base_sd, _, vectors = big_set
    merged = merge(base_sd, vectors[:1], [1.0], method="dare_linear", params={"density": 0.3, "seed": 5})
    delta = vectors[0].get_tensor("big.weight")
    kept = merged["big.weight"] != base_sd["big.weight"]
    assert float(kept.float().mean()) == pytest.approx(0.3, abs=0.002)
    torch.testing.assert_close(merged["big.weight"][kept], (base_sd["big.weight"] + delta / 0.3)[kept])


def test_dare_masks_differ_between_inputs_and_between_tensor_names():
    t = torch.ones(4096)
    base = {"a": torch.zeros(4096), "b": torch.zeros(4096)}
    vector = TaskVector.extract(base, {"a": t, "b": t})
    merged = merge(base, [vector, vector], [1.0, 0.0], method="dare_linear", params={"density": 0.5})
    assert not torch.equal(merged["a"], merged["b"])
    first_only = merge(base, [vector, vector], [1.0, 0.0], method="dare_linear", params={"density": 0.5})["a"]
    second_only = merge(base, [vector, vector], [0.0, 1.0], method="dare_linear", params={"density": 0.5})["a"]
    assert not torch.equal(first_only, second_only)


@pytest.mark.parametrize("start", [0, CHUNK_ELEMENTS])
def test_keep_mask_of_a_chunk_is_the_matching_slice_of_the_whole_tensor_mask(start):
    numel = CHUNK_ELEMENTS + RANDOM_BLOCK // 2 + 17
    ctx = MergeContext(name="layer.w", start=start, numel=numel, params={"seed": 9})
    length = min(CHUNK_ELEMENTS, numel - start)
    whole = ref_keep_mask(9, 2, "layer.w", numel, 0.3)
    assert torch.equal(ctx.keep_mask(2, length, 0.3), whole[start : start + length])


def test_dare_output_is_identical_for_a_sharded_and_a_single_file_base(fp32_set, tmp_path, out_dir, hf_dir):
    vectors = extract_all(fp32_set)
    sharded = hf_dir(tmp_path / "sharded_base", fp32_set.base_sd, num_shards=3)
    params = {"density": 0.6, "seed": 4}
    a = merge_to(fp32_set.base, vectors, WEIGHTS, method="dare_ties", params=params, output=out_dir / "a.safetensors")
    b = merge_to(sharded, vectors, WEIGHTS, method="dare_ties", params=params, output=out_dir / "b", max_shard_size="600B")
    assert_state_equal(load_output(out_dir / "a.safetensors"), load_output(out_dir / "b"))
    assert a.fingerprint == b.fingerprint


# -- dtypes ---------------------------------------------------------------------------


def test_output_dtype_is_the_base_dtype_by_default(bf16_set):
    merged = merge(bf16_set.base, extract_all(bf16_set), WEIGHTS)
    assert {n: t.dtype for n, t in merged.items()} == {n: t.dtype for n, t in bf16_set.base_sd.items()}


def test_dtype_option_sets_the_dtype_of_floating_tensors_only(fp32_set, out_dir):
    output = out_dir / "m.safetensors"
    merge_to(fp32_set.base, extract_all(fp32_set), WEIGHTS, dtype="bfloat16", output=output)
    merged = load_file(str(output))
    expected = reference_merge(fp32_set.base_sd, fp32_set.finetune_sds, WEIGHTS, "task_arithmetic")
    for name, t in merged.items():
        if expected[name].is_floating_point():
            assert t.dtype == torch.bfloat16
            torch.testing.assert_close(t, expected[name].bfloat16())
        else:
            assert torch.equal(t, expected[name])


def test_float64_compute_keeps_float64_precision_that_float32_compute_loses():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(500, generator=g, dtype=torch.float64)}
    ft = {"w": base["w"] + 1e-3 * torch.randn(500, generator=g, dtype=torch.float64)}
    vector = TaskVector.extract(base, ft)
    expected = base["w"] + 0.37 * (ft["w"] - base["w"])
    precise = merge(base, [vector], [1.0], scale=0.37, compute_dtype="float64")["w"]
    rough = merge(base, [vector], [1.0], scale=0.37)["w"]
    assert precise.dtype == rough.dtype == torch.float64
    torch.testing.assert_close(precise, expected, rtol=1e-14, atol=1e-15)
    assert float((rough - expected).abs().max()) > 1e-9


def test_tensors_outside_the_vectors_are_copied_unchanged(fp32_set):
    vectors = [TaskVector.extract(fp32_set.base, ft, exclude=["embed.*"]) for ft in fp32_set.finetunes]
    merged = merge(fp32_set.base, vectors, WEIGHTS, method="ties", params={"density": 0.5})
    for name in ("embed.weight", "position_ids", "attn.mask"):
        assert torch.equal(merged[name], fp32_set.base_sd[name])
    assert not torch.equal(merged["norm.weight"], fp32_set.base_sd["norm.weight"])


def test_merge_result_describes_the_merge(fp32_set, out_dir):
    output = out_dir / "m"
    result = merge_to(fp32_set.base, extract_all(fp32_set), [1, 2, 3], method="ties", scale=0.5, params={"density": 0.5}, output=output)
    assert result.method == "ties" and result.scale == 0.5 and result.weights == [1.0, 2.0, 3.0]
    assert result.params == {"density": 0.5}
    assert result.base_fingerprint == open_checkpoint(fp32_set.base).fingerprint()
    assert result.num_tensors == 7
    assert result.num_parameters == sum(t.numel() for t in fp32_set.base_sd.values())
    assert result.output == output
    assert result.fingerprint == open_checkpoint(output).fingerprint()


def test_merged_output_records_its_base_and_is_not_mistaken_for_a_task_vector(fp32_set, out_dir):
    output = out_dir / "m.safetensors"
    merge_to(fp32_set.base, extract_all(fp32_set), WEIGHTS, output=output, metadata={"run": "r1"})
    with safe_open(str(output), "pt") as f:
        meta = f.metadata()
    assert meta["taskvec.base_fingerprint"] == open_checkpoint(fp32_set.base).fingerprint()
    assert meta["taskvec.kind"] == "composite" and meta["run"] == "r1"
    with pytest.raises(TaskVecError, match="is a composite checkpoint, not a task vector"):
        TaskVector.load(output)


@pytest.mark.parametrize("method, params", ALL_METHODS + LATER_METHODS)
def test_zero_element_tensors_merge_to_zero_element_tensors(out_dir, method, params):
    base = {"empty": torch.zeros(0, 4), "w": torch.zeros(6)}
    ft = {"empty": torch.zeros(0, 4), "w": torch.ones(6)}
    vector = TaskVector.extract(base, ft)
    count = METHODS[method].inputs or 1
    merge_to(base, [vector] * count, [1.0] * count, method=method, params=params, output=out_dir / "m.safetensors")
    assert load_file(str(out_dir / "m.safetensors"))["empty"].shape == (0, 4)


# -- the exact magnitude threshold ----------------------------------------------------


def chunks_of(t: torch.Tensor, size: int):
    flat = t.reshape(-1)
    return lambda: (flat[i : i + size] for i in range(0, flat.numel(), size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel, chunk", [(1, 1), (1000, 1000), (1000, 97), (50_000, 4096)])
def test_trim_threshold_matches_topk(dtype, numel, chunk):
    g = torch.Generator().manual_seed(numel)
    t = torch.randn(numel, generator=g, dtype=dtype) * torch.exp(4 * torch.randn(numel, generator=g, dtype=dtype))
    magnitudes = t.abs()
    for k in sorted({1, min(2, numel), max(1, numel // 3), numel}):
        expected = float(torch.topk(magnitudes, k).values[-1])
        assert trim_threshold(chunks_of(t, chunk), k, dtype).value == expected


def test_trim_threshold_over_more_than_a_chunk_matches_topk():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(CHUNK_ELEMENTS + 12345, generator=g)
    for k in (1, 777_777, t.numel()):
        assert trim_threshold(chunks_of(t, CHUNK_ELEMENTS), k, torch.float32).value == float(torch.topk(t.abs(), k).values[-1])


def test_trim_threshold_handles_zeros_negative_zero_ties_and_subnormals():
    t = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 2.0, -2.0, 2.0, 3.0, float("inf")], dtype=torch.float32)
    got = [trim_threshold(chunks_of(t, 4), k, torch.float32).value for k in range(1, t.numel() + 1)]
    assert got == [float(v) for v in torch.sort(t.abs(), descending=True).values]


def test_trim_threshold_refuses_k_beyond_the_entries():
    with pytest.raises(ValueError, match="k exceeds the number of entries"):
        trim_threshold(chunks_of(torch.ones(5), 2), 6, torch.float32)


# -- bad merge requests ---------------------------------------------------------------


@pytest.fixture
def good(fp32_set):
    return fp32_set.base, extract_all(fp32_set)


def refused(output, match, *args, **kwargs):
    with pytest.raises(TaskVecError, match=match) as info:
        merge_to(*args, output=output, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("output_name", ["m.safetensors", "m"])
def test_unknown_method_is_refused_naming_it_and_the_known_ones(good, out_dir, assert_no_output, output_name):
    base, vectors = good
    message = refused(out_dir / output_name, "unknown merge method 'average'", base, vectors, WEIGHTS, method="average")
    assert "dare_linear" in message and "ties" in message
    assert_no_output(out_dir / output_name)


@pytest.mark.parametrize(
    "method", ["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "consensus_ties"]
)
@pytest.mark.parametrize("density", [0, 1.5, -0.1, float("nan"), "0.5", True])
def test_density_outside_zero_one_is_refused(good, out_dir, assert_no_output, method, density):
    base, vectors = good
    refused(out_dir / "m", r"params.density: .* must be a number in \(0, 1[\])]", base, vectors, WEIGHTS, method=method, params={"density": density})
    assert_no_output(out_dir / "m")


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_density_one_is_accepted(good, out_dir, method):
    base, vectors = good
    result = merge_to(base, vectors, WEIGHTS, method=method, params={"density": 1.0}, output=out_dir / "m")
    assert result.params["density"] == 1.0 and (out_dir / "m" / "model.safetensors").is_file()


def test_missing_density_is_refused(good):
    base, vectors = good
    with pytest.raises(TaskVecError, match="method 'ties' needs parameter 'density'"):
        merge(base, vectors, WEIGHTS, method="ties")


def test_unknown_parameter_is_refused_naming_it(good):
    base, vectors = good
    with pytest.raises(TaskVecError, match="method 'ties' takes no parameter 'seed'"):
        merge(base, vectors, WEIGHTS, method="ties", params={"density": 0.5, "seed": 1})


def test_non_integer_seed_is_refused(good):
    base, vectors = good
    with pytest.raises(TaskVecError, match="params.seed: '1' must be an integer"):
        merge(base, vectors, WEIGHTS, method="dare_linear", params={"density": 0.5, "seed": "1"})


@pytest.mark.parametrize(
    ("weight", "why"),
    [("heavy", "is not a number"), (None, "is not a number"), (True, "is not a number"),
     (float("nan"), "is not a finite number"), (float("inf"), "is not a finite number")],
)
def test_non_numeric_weight_is_refused_naming_its_position(good, out_dir, assert_no_output, weight, why):
    base, vectors = good
    refused(out_dir / "m.safetensors", rf"vectors\[1\].weight: {weight!r} {why}", base, vectors, [1.0, weight, 1.0])
    assert_no_output(out_dir / "m.safetensors")


def test_non_numeric_scale_is_refused(good, out_dir, assert_no_output):
    base, vectors = good
    refused(out_dir / "m.safetensors", "scale: 'big' is not a number", base, vectors, WEIGHTS, scale="big")
    assert_no_output(out_dir / "m.safetensors")


def test_empty_vector_list_is_refused(good, out_dir, assert_no_output):
    base, _ = good
    refused(out_dir / "m.safetensors", "no task vectors to merge: the vector list is empty", base, [], [])
    assert_no_output(out_dir / "m.safetensors")


def test_weight_count_must_match_vector_count(good, out_dir, assert_no_output):
    base, vectors = good
    refused(out_dir / "m.safetensors", "3 task vectors but 2 weights", base, vectors, [1.0, 1.0])
    assert_no_output(out_dir / "m.safetensors")


def test_missing_base_is_refused_naming_the_path(good, tmp_path, out_dir, assert_no_output):
    _, vectors = good
    refused(out_dir / "m", f"{tmp_path / 'no_base'}: no such file or directory", tmp_path / "no_base", vectors, WEIGHTS)
    assert_no_output(out_dir / "m")


def test_existing_output_is_refused_and_kept_unless_overwrite(good, out_dir):
    base, vectors = good
    output = out_dir / "m.safetensors"
    output.write_bytes(b"previous")
    refused(output, "m.safetensors: output already exists", base, vectors, WEIGHTS)
    assert output.read_bytes() == b"previous"
    merge_to(base, vectors, WEIGHTS, output=output, overwrite=True)
    assert sorted(load_file(str(output))) == sorted(open_checkpoint(base).keys())
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.safetensors"]


def test_vector_from_a_different_base_is_refused_naming_both_fingerprints(good, tmp_path, fp32_set, out_dir, assert_no_output):
    base, vectors = good
    other = {n: (t * 2 if t.is_floating_point() else t) for n, t in fp32_set.base_sd.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    message = refused(out_dir / "m", r"vectors\[0\] was extracted from a different base", tmp_path / "other.safetensors", vectors, WEIGHTS)
    assert vectors[0].base_fingerprint[:16] in message
    assert open_checkpoint(tmp_path / "other.safetensors").fingerprint()[:16] in message
    assert_no_output(out_dir / "m")


@pytest.mark.parametrize("method, params", ALL_METHODS + LATER_METHODS)
def test_a_tensor_an_input_lacks_counts_as_zero_in_that_input(good, fp32_set, method, params):
    """The rule for inputs that cover different tensors (e.g. one extracted with exclude), for
    every method: the same result, bit for bit, as that input with explicit zeros in the tensors
    it lacks (a 1-D tensor and a matrix, which the SVD methods take whole)."""
    base, vectors = good
    lacking = ["norm.weight", "embed.weight"]
    partial = TaskVector.extract(fp32_set.base, fp32_set.finetunes[1], exclude=lacking)
    zeros = {n: (torch.zeros_like(t) if n in lacking else t) for n, t in ((n, vectors[1].get_tensor(n)) for n in vectors[1].names)}
    padded = TaskVector.load(StateDictCheckpoint(zeros, metadata=vectors[1].metadata()))

    merged = merge(base, [vectors[0], partial], [1.0, -0.5], method=method, scale=0.7, params=params)
    reference = merge(base, [vectors[0], padded], [1.0, -0.5], method=method, scale=0.7, params=params)

    for name in reference:
        assert torch.equal(merged[name], reference[name]), name
    if method == "task_arithmetic":  # and from the formula, in float64
        expected = fp32_set.base_sd["norm.weight"].double() + 0.7 * (fp32_set.finetune_sds[0]["norm.weight"].double() - fp32_set.base_sd["norm.weight"].double())
        assert torch.allclose(merged["norm.weight"].double(), expected, atol=1e-6)


def test_inputs_whose_shapes_differ_are_refused_naming_both(good, fp32_set, out_dir, assert_no_output):
    base, vectors = good
    reshaped = {n: (t.reshape(-1) if n == "embed.weight" else t) for n, t in ((n, vectors[1].get_tensor(n)) for n in vectors[1].names)}
    odd = TaskVector.load(StateDictCheckpoint(reshaped, source="reshaped.safetensors", metadata=vectors[1].metadata()))
    message = refused(out_dir / "m", "tensor 'embed.weight' has shape", base, [vectors[0], odd], [1.0, 1.0])
    assert f"in vectors[0] (task vector from {fp32_set.finetunes[0]})" in message
    assert "in vectors[1] (task vector from reshaped.safetensors)" in message
    assert_no_output(out_dir / "m")


def _with_value(sd, name, index, value):
    out = dict(sd)
    out[name] = sd[name].clone()
    out[name].view(-1)[index] = value
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_finetune_is_refused_naming_tensor_and_file(fp32_set, tmp_path, out_dir, assert_no_output, value):
    save_file(_with_value(fp32_set.finetune_sds[1], "layers.1.mlp.weight", 5, value), str(tmp_path / "bad_ft.safetensors"))
    vectors = [TaskVector.extract(fp32_set.base, fp32_set.finetunes[0]), TaskVector.extract(fp32_set.base, tmp_path / "bad_ft.safetensors")]
    for output, shard in ((out_dir / "m.safetensors", None), (out_dir / "m", "500B")):
        refused(output, r"tensor 'layers.1.mlp.weight' of .*bad_ft.safetensors holds NaN or Inf", fp32_set.base, vectors, [1.0, 1.0], max_shard_size=shard)
        assert_no_output(output)


def test_nonfinite_base_is_refused_naming_tensor_and_base(fp32_set, tmp_path, out_dir, assert_no_output):
    bad_base = tmp_path / "bad_base.safetensors"
    save_file(_with_value(fp32_set.base_sd, "norm.weight", 0, float("inf")), str(bad_base))
    vector = TaskVector.extract(bad_base, fp32_set.finetunes[0])
    refused(out_dir / "m", r"tensor 'norm.weight' of .*bad_base.safetensors holds NaN or Inf", bad_base, [vector], [1.0])
    assert_no_output(out_dir / "m")


def test_nonfinite_inputs_are_accepted_with_allow_nonfinite(fp32_set, tmp_path, out_dir):
    save_file(_with_value(fp32_set.finetune_sds[0], "norm.weight", 2, float("nan")), str(tmp_path / "nan_ft.safetensors"))
    vector = TaskVector.extract(fp32_set.base, tmp_path / "nan_ft.safetensors")
    merge_to(fp32_set.base, [vector], [1.0], output=out_dir / "m.safetensors", allow_nonfinite=True)
    merged = load_file(str(out_dir / "m.safetensors"))
    assert torch.isnan(merged["norm.weight"][2])
    assert int(torch.isnan(merged["norm.weight"]).sum()) == 1


def test_failed_merge_with_overwrite_keeps_the_previous_output(fp32_set, tmp_path, out_dir):
    output = out_dir / "m"
    merge_to(fp32_set.base, [TaskVector.extract(fp32_set.base, fp32_set.finetunes[0])], [1.0], output=output)
    before = open_checkpoint(output).fingerprint()
    save_file(_with_value(fp32_set.finetune_sds[1], "norm.weight", 0, float("nan")), str(tmp_path / "nan_ft.safetensors"))
    bad = TaskVector.extract(fp32_set.base, tmp_path / "nan_ft.safetensors")
    refused(output, "holds NaN or Inf", fp32_set.base, [bad], [1.0], overwrite=True)
    assert open_checkpoint(output).fingerprint() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["m"]
