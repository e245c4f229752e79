"""The later merge methods (TSV-M, Iso-C, Iso-CTS, breadcrumbs, DELLA, consensus, SLERP) and
per-layer coefficients, against plain float64 references written from the formulas of docs/methods.md."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_methods import ref_elect_and_mean, ref_weighted_sum

from mlflow_taskvec.engine import TaskVector, merge, merge_to, open_checkpoint
from mlflow_taskvec.engine.methods import METHODS, MergeContext, get_method, validate_params
from mlflow_taskvec.engine.methods.isotropic import iso_c_merge, iso_cts_merge, iso_cts_split
from mlflow_taskvec.engine.methods.spectral import thin_svd
from mlflow_taskvec.engine.methods.tsv import tsv_merge
from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS, RANDOM_BLOCK, derive_seed
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.compose import compose_to
from mlflow_taskvec.recipe import parse_recipe

# about 30 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(30)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"

# square, wide, tall, 1-D, 0-D, and an integer buffer the vectors do not cover
SHAPES = {"sq.weight": (9, 9), "wide.weight": (5, 14), "tall.weight": (13, 6), "norm.weight": (11,), "gain": ()}


# -- references: whole tensors, float64, plain loops, straight from the formulas --------------


def svd64(x):
    return torch.linalg.svd(x, full_matrices=False)


def polar64(x):
    p, _, qh = svd64(x)
    return p @ qh


def ref_mean(ds):
    return sum(ds) / len(ds)


def ref_tsv_m(ds):
    m, n = ds[0].shape
    k = max(1, math.floor(min(m, n) / len(ds)))
    us, ss, vs = [], [], []
    for d in ds:
        u, s, vh = svd64(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh.T[:, :k])
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return polar64(u) @ torch.diag(s) @ polar64(v).T


def ref_iso_c(ds):
    u, s, vh = svd64(sum(ds))
    return s.mean() * (u @ vh)


def ref_iso_cts(ds, common_fraction):
    m, n = ds[0].shape
    r, tasks = min(m, n), len(ds)
    c = int(r * common_fraction)
    c = r - round((r - c) / tasks) * tasks
    s = (r - c) // tasks
    u, sv, vh = svd64(sum(ds))
    uc, sc, vc = u[:, :c], sv[:c], vh.T[:, :c]
    blocks_u, blocks_s, blocks_v = [], [], []
    for d in ds:
        ui, si, vhi = svd64(d - uc @ uc.T @ d)
        blocks_u.append(ui[:, :s])
        blocks_s.append(si[:s])
        blocks_v.append(vhi.T[:, :s])
    big_u, big_s, big_v = torch.cat(blocks_u + [uc], 1), torch.cat(blocks_s + [sc]), torch.cat(blocks_v + [vc], 1)
    assert big_u.shape[1] == r
    return polar64(big_u) @ torch.diag(torch.full_like(big_s, float(big_s.mean()))) @ polar64(big_v).T


def ascending_ranks(values: list[float], earlier_ranks_higher: bool) -> list[int]:
    """rank[j] of each value in ascending order; equal values rank by position."""
    order = sorted(range(len(values)), key=lambda j: (values[j], -j if earlier_ranks_higher else j))
    ranks = [0] * len(values)
    for rank, j in enumerate(order):
        ranks[j] = rank
    return ranks


def ref_band(t, density, gamma):
    flat = t.reshape(-1)
    n = flat.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    ranks = ascending_ranks(flat.abs().tolist(), earlier_ranks_higher=True)
    out = torch.zeros_like(flat)
    for j in range(n):
        if bottom <= ranks[j] < bottom + keep:
            out[j] = flat[j]
    return out.reshape(t.shape)


def ref_trim(t, density):
    """The ties trim: the k = max(1, int(density * n)) largest magnitudes, the first in
    flattened order among equal ones (bf16 deltas tie often)."""
    flat = t.reshape(-1)
    n = flat.numel()
    k = max(1, int(density * n))
    ranks = ascending_ranks(flat.abs().tolist(), earlier_ranks_higher=True)
    return torch.tensor([flat[j] if ranks[j] >= n - k else 0.0 for j in range(n)], dtype=t.dtype).reshape(t.shape)


def ref_della_keep_probability(t, density, epsilon):
    rows = t.reshape(1, -1) if t.dim() != 2 else t
    p = torch.zeros_like(rows)
    for i in range(rows.shape[0]):
        n = rows.shape[1]
        ranks = ascending_ranks(rows[i].abs().tolist(), earlier_ranks_higher=False)
        for j in range(n):
            rank_norm = ranks[j] / (n - 1) if n > 1 else 0.5
            p[i, j] = density - epsilon + 2 * epsilon * rank_norm
    return p.reshape(t.shape)


def ref_uniforms(seed, input_index, name, numel):
    """The draws behind every keep mask: one generator per block of RANDOM_BLOCK entries."""
    parts = []
    for block in range(math.ceil(numel / RANDOM_BLOCK)):
        length = min(RANDOM_BLOCK, numel - block * RANDOM_BLOCK)
        gen = torch.Generator().manual_seed(derive_seed(seed, input_index, name, block))
        parts.append(torch.rand(length, generator=gen).double())
    return torch.cat(parts)


def ref_della_drop(t, density, epsilon, seed, input_index, name):
    p = ref_della_keep_probability(t, density, epsilon)
    keep = ref_uniforms(seed, input_index, name, t.numel()).reshape(t.shape) < p
    return torch.where(keep, t / p, 0.0)


def ref_consensus_mask(ds, k, mask_lambda):
    total = sum(ds)
    count = torch.zeros_like(total)
    for d in ds:
        count = count + (d.abs() >= mask_lambda * (total - d).abs()).double()
    return (count >= k).double()


def ref_slerp(v1, v2, t):
    a, b = v1.reshape(-1), v2.reshape(-1)
    cos = float(a @ b) / (float(a.norm()) * float(b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * v1 + t * v2
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta) * v1 + math.sin(t * theta) / math.sin(theta) * v2


def ref_merged(method, name, base, ts, weights, params):
    """The merged delta of one tensor (float64)."""
    ds = [w * t for w, t in zip(weights, ts)]
    matrix = base.dim() == 2 and not any(fnmatch.fnmatchcase(name, g) for g in params.get("exclude", []))
    if method in ("tsv_m", "iso_c", "iso_cts") and not matrix:
        return ref_mean(ds)
    if method == "tsv_m":
        return ref_tsv_m(ds)
    if method == "iso_c":
        return ref_iso_c(ds)
    if method == "iso_cts":
        return ref_iso_cts(ds, params.get("common_fraction", 0.8))
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        banded = [ref_band(t, params["density"], params.get("gamma", 0.01)) for t in ts]
        if method == "breadcrumbs":
            return ref_weighted_sum(banded, weights)
        return ref_elect_and_mean([w * b for w, b in zip(weights, banded)], weights)
    if method in ("della", "della_linear"):
        dropped = [ref_della_drop(t, params["density"], params.get("epsilon", 0.1), params.get("seed", 0), i, name) for i, t in enumerate(ts)]
        if method == "della_linear":
            return ref_weighted_sum(dropped, weights)
        return ref_elect_and_mean([w * d for w, d in zip(weights, dropped)], weights)
    if method in ("consensus_ta", "consensus_ties"):
        mask = ref_consensus_mask(ds, params.get("k", 2), params.get("mask_lambda", 0.4))
        if method == "consensus_ta":
            return sum(ds) * mask
        return ref_elect_and_mean([w * ref_trim(t, params["density"]) for w, t in zip(weights, ts)], weights) * mask
    if method == "slerp":
        return ref_slerp(base + ds[0], base + ds[1], params["t"]) - base
    raise AssertionError(method)


def reference_merge(base_sd, ft_sds, weights, method, scale, params):
    out = {}
    for name, b in base_sd.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        b64 = b.double()
        ts = [ft[name].double() - b64 for ft in ft_sds]
        out[name] = (b64 + scale * ref_merged(method, name, b64, ts, weights, params)).to(b.dtype)
    return out


# -- checkpoints ----------------------------------------------------------------------------


def random_models(seed: int, count: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in SHAPES.items()}
    base["position_ids"] = torch.arange(6, dtype=torch.int64)
    fts = []
    for _ in range(count):
        fts.append({n: (t.float() + 0.3 * torch.randn(t.shape, generator=g)).to(dtype) if t.is_floating_point() else t.clone() for n, t in base.items()})
    return base, fts


def write_set(folder: Path, base, fts):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        save_file(ft, str(folder / f"ft{i}.safetensors"))
        paths.append(folder / f"ft{i}.safetensors")
    return folder / "base.safetensors", paths


NEW_METHODS = [
    pytest.param("tsv_m", {}, id="tsv_m"),
    pytest.param("iso_c", {}, id="iso_c"),
    pytest.param("iso_cts", {"common_fraction": 0.6}, id="iso_cts"),
    pytest.param("breadcrumbs", {"density": 0.5, "gamma": 0.1}, id="breadcrumbs"),
    pytest.param("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, id="breadcrumbs_ties"),
    pytest.param("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}, id="della"),
    pytest.param("della_linear", {"density": 0.5, "epsilon": 0.2, "seed": 3}, id="della_linear"),
    pytest.param("consensus_ta", {"k": 2, "mask_lambda": 0.4}, id="consensus_ta"),
    pytest.param("consensus_ties", {"density": 0.6, "k": 2, "mask_lambda": 0.3}, id="consensus_ties"),
    pytest.param("slerp", {"t": 0.3}, id="slerp"),
]
SVD_METHODS = ("tsv_m", "iso_c", "iso_cts")


def inputs_for(method):
    return (2, [1.0, 1.0]) if method == "slerp" else (3, [0.7, 1.2, 0.9])


# -- each method against its reference -----------------------------------------------------------


@pytest.mark.parametrize("method, params", NEW_METHODS)
@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_method_matches_its_float64_reference(tmp_path, method, params, compute):
    count, weights = inputs_for(method)
    base, fts = random_models(1, count)
    base_path, ft_paths = write_set(tmp_path, base, fts)
    vectors = [TaskVector.extract(base_path, p) for p in ft_paths]
    merged = merge(base_path, vectors, weights, method=method, scale=0.8, params=params, compute_dtype=compute)
    expected = reference_merge(base, fts, weights, method, 0.8, validate_params(get_method(method), params))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if compute == "float32" else {"rtol": 1e-6, "atol": 1e-6}
    assert sorted(merged) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method, params", NEW_METHODS)
def test_method_on_bf16_checkpoints_matches_its_reference_and_writes_bf16(tmp_path, method, params):
    count, weights = inputs_for(method)
    base, fts = random_models(2, count, torch.bfloat16)
    base_path, ft_paths = write_set(tmp_path, base, fts)
    vectors = [TaskVector.extract(base_path, p) for p in ft_paths]
    merge_to(base_path, vectors, weights, output=tmp_path / "m.safetensors", method=method, params=params, scale=0.8)
    merged = load_file(str(tmp_path / "m.safetensors"))
    expected = reference_merge(base, fts, weights, method, 0.8, validate_params(get_method(method), params))
    for name in expected:
        assert merged[name].dtype == base[name].dtype, name
        # one bf16 step at most: float32 and float64 arithmetic may round to neighbouring bf16 values
        torch.testing.assert_close(merged[name], expected[name], rtol=2 ** -7, atol=1e-2, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method, params", NEW_METHODS)
def test_sharded_and_single_file_layouts_give_the_same_output(tmp_path, hf_dir, method, params):
    count, weights = inputs_for(method)
    base, fts = random_models(3, count)
    base_path, ft_paths = write_set(tmp_path / "single", base, fts)
    single = merge_to(base_path, [TaskVector.extract(base_path, p) for p in ft_paths], weights, output=tmp_path / "single.safetensors", method=method, params=params)
    sharded_base = hf_dir(tmp_path / "sharded-base", base, num_shards=3)
    sharded_fts = [hf_dir(tmp_path / f"sharded-ft{i}", ft, num_shards=2) for i, ft in enumerate(fts)]
    vectors = [TaskVector.extract(sharded_base, p) for p in sharded_fts]
    vectors[0].save(tmp_path / "vector0", max_shard_size="1KB")
    vectors[0] = TaskVector.load(tmp_path / "vector0")
    sharded = merge_to(sharded_base, vectors, weights, output=tmp_path / "sharded", method=method, params=params, max_shard_size="1KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert single.fingerprint == sharded.fingerprint == open_checkpoint(tmp_path / "sharded").fingerprint()


@pytest.mark.parametrize("method, params", [p for p in NEW_METHODS if p.id in ("breadcrumbs", "breadcrumbs_ties", "consensus_ta", "consensus_ties")])
def test_streamed_method_matches_its_reference_on_a_tensor_larger_than_a_chunk(method, params):
    """More than one chunk: the breadcrumbs band is planned over chunks, the consensus mask per chunk."""
    g = torch.Generator().manual_seed(5)
    numel = CHUNK_ELEMENTS + 4321
    base = {"big": torch.randn(numel, generator=g)}
    # distinct magnitudes, so the band's ranks are unambiguous
    fts = []
    for _ in range(3):
        magnitude = (torch.randperm(numel, generator=g) + 1).double() / numel
        sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0).double()
        fts.append({"big": (base["big"].double() + sign * magnitude).float()})
    weights = [0.7, 1.2, 0.9]
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    merged = merge(base, vectors, weights, method=method, params=params, compute_dtype="float64")
    b64 = base["big"].double()
    ts = [ft["big"].double() - b64 for ft in fts]
    expected = b64 + ref_merged_fast(method, ts, weights, validate_params(get_method(method), params))
    torch.testing.assert_close(merged["big"], expected.float())


def ref_merged_fast(method, ts, weights, params):
    """The same formulas with a sort instead of the plain loop, for a tensor of a million entries."""
    if method.startswith("breadcrumbs"):
        banded = []
        for t in ts:
            n = t.numel()
            keep, top = int(params["density"] * n), int(params["gamma"] * n)
            bottom = max(0, n - keep - top)
            ranks = torch.empty(n, dtype=torch.int64)
            ranks[torch.argsort(t.abs())] = torch.arange(n)
            banded.append(torch.where((ranks >= bottom) & (ranks < bottom + keep), t, 0.0))
        if method == "breadcrumbs":
            return ref_weighted_sum(banded, weights)
        return ref_elect_and_mean([w * b for w, b in zip(weights, banded)], weights)
    ds = [w * t for w, t in zip(weights, ts)]
    mask = ref_consensus_mask(ds, params["k"], params["mask_lambda"])
    if method == "consensus_ta":
        return sum(ds) * mask
    return ref_elect_and_mean([w * ref_trim(t, params["density"]) for w, t in zip(weights, ts)], weights) * mask


# -- mergekit parity -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_equals_mergekit(method):
    """Fixtures from mergekit 0.1.5 (tests/fixtures/make_mergekit_fixtures.py): breadcrumbs with
    normalize false, breadcrumbs_ties with normalize true, on deltas of distinct magnitudes."""
    settings = json.loads((FIXTURES / "settings.json").read_text())
    base = FIXTURES / "base.safetensors"
    vectors = [TaskVector.extract(base, FIXTURES / entry["finetuned"]) for entry in settings["inputs"]]
    weights = [entry["weight"] for entry in settings["inputs"]]
    ours = merge(base, vectors, weights, method=method, params=settings["params"])
    theirs = load_file(str(FIXTURES / f"{method}.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.equal(ours[n], load_file(str(base))[n]) for n in theirs)


def test_mergekit_fixtures_stay_small():
    assert sum(f.stat().st_size for f in FIXTURES.iterdir()) < 200_000


# -- properties ------------------------------------------------------------------------------


def flipping_svd(seed: int):
    """A thin SVD whose singular vector pairs have random signs: an equally valid factorization."""
    g = torch.Generator().manual_seed(seed)

    def svd(x):
        u, s, vh = thin_svd(x)
        signs = torch.where(torch.rand(s.numel(), generator=g) < 0.5, -1.0, 1.0).to(x.dtype)
        return u * signs, s, vh * signs[:, None]

    return svd


@pytest.mark.parametrize("shape", [(9, 9), (5, 14), (13, 6)])
@pytest.mark.parametrize(
    "merge_fn", [tsv_merge, iso_c_merge, lambda ds, svd=thin_svd: iso_cts_merge(ds, 0.6, svd)], ids=["tsv_m", "iso_c", "iso_cts"]
)
def test_svd_methods_do_not_depend_on_the_signs_of_singular_vectors(shape, merge_fn):
    g = torch.Generator().manual_seed(7)
    ds = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    expected = merge_fn(ds)
    for seed in range(3):
        flipped = merge_fn(ds, svd=flipping_svd(seed))
        torch.testing.assert_close(flipped, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(flipping_svd(0)(ds[0])[0], thin_svd(ds[0])[0])  # the flips are real


@pytest.mark.parametrize("method, params", NEW_METHODS)
def test_the_same_recipe_twice_gives_the_same_fingerprint(tmp_path, method, params):
    count, weights = inputs_for(method)
    base, fts = random_models(4, count)
    base_path, ft_paths = write_set(tmp_path, base, fts)
    data = {"base": str(base_path), "method": method, "params": params, "scale": 0.9,
            "vectors": [{"finetuned": str(p), "weight": w} for p, w in zip(ft_paths, weights)]}
    first = compose_to(parse_recipe(data), output=tmp_path / "a.safetensors")
    second = compose_to(parse_recipe(data), output=tmp_path / "b")
    assert first.fingerprint == second.fingerprint
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_della_is_unbiased_the_mean_over_seeds_converges_to_the_task_vector():
    g = torch.Generator().manual_seed(9)
    t = torch.randn(16, 24, generator=g, dtype=torch.float64)
    params = validate_params(get_method("della_linear"), {"density": 0.4, "epsilon": 0.2})
    seeds = 600
    total = torch.zeros_like(t)
    for seed in range(seeds):
        ctx = MergeContext(name="w", start=0, numel=t.numel(), params={**params, "seed": seed}, shape=t.shape, whole_tensor=True)
        total += METHODS["della_linear"].fn([t], [1.0], ctx)
    mean = total / seeds
    p = ref_della_keep_probability(t, 0.4, 0.2)
    standard_error = t.abs() * ((1 - p) / (p * seeds)).sqrt()
    assert float(((mean - t).abs() / standard_error).max()) < 5.0
    # the mean error is within 3 standard errors of zero over all 384 entries
    z = (mean - t) / standard_error
    assert abs(float(z.mean())) * math.sqrt(t.numel()) < 3.0


def test_della_keeps_larger_entries_more_often_within_each_row():
    t = torch.arange(1.0, 201.0, dtype=torch.float64).reshape(2, 100)
    params = {"density": 0.5, "epsilon": 0.4}
    kept = torch.zeros_like(t)
    for seed in range(200):
        ctx = MergeContext(name="w", start=0, numel=t.numel(), params={**params, "seed": seed}, shape=t.shape, whole_tensor=True)
        kept += METHODS["della_linear"].fn([t], [1.0], ctx) != 0
    rate = kept / 200
    # p runs from 0.1 to 0.9 along each row, the same in both rows (ranks are per row)
    assert float(rate[:, :10].mean()) < 0.2 and float(rate[:, -10:].mean()) > 0.8
    assert abs(float(rate[0].mean() - rate[1].mean())) < 0.05


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_with_the_same_seed_is_identical_and_with_another_differs(tmp_path, method):
    base, fts = random_models(6, 3)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    a = merge(base, vectors, [1.0, 1.0, 1.0], method=method, params={"density": 0.5, "seed": 1})
    b = merge(base, vectors, [1.0, 1.0, 1.0], method=method, params={"density": 0.5, "seed": 1})
    c = merge(base, vectors, [1.0, 1.0, 1.0], method=method, params={"density": 0.5, "seed": 2})
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["sq.weight"], c["sq.weight"])


def test_svd_methods_merge_excluded_matrices_as_the_mean():
    base, fts = random_models(8, 3)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    merged = merge(base, vectors, [1.0, 0.5, 2.0], method="tsv_m", params={"exclude": ["wide.*"]})
    ts = [ft["wide.weight"] - base["wide.weight"] for ft in fts]
    torch.testing.assert_close(merged["wide.weight"], base["wide.weight"] + (ts[0] + 0.5 * ts[1] + 2.0 * ts[2]) / 3)
    not_excluded = merge(base, vectors, [1.0, 0.5, 2.0], method="tsv_m")
    assert not torch.allclose(not_excluded["wide.weight"], merged["wide.weight"])
    torch.testing.assert_close(not_excluded["sq.weight"], merged["sq.weight"])


@pytest.mark.parametrize("r, tasks, fraction, expected", [(9, 3, 0.6, (6, 1)), (6, 3, 0.8, (3, 1)), (16, 8, 0.8, (16, 0)), (20, 4, 0.3, (4, 4)), (2, 3, 0.1, (2, 0))])
def test_iso_cts_splits_r_into_common_and_per_task_directions(r, tasks, fraction, expected):
    c, s = iso_cts_split(r, tasks, fraction)
    assert (c, s) == expected and c + tasks * s == r


def test_slerp_at_the_ends_gives_each_fine_tune_and_is_norm_preserving_between():
    base, fts = random_models(10, 2)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    for t, ft in ((0.0, fts[0]), (1.0, fts[1])):
        merged = merge(base, vectors, [1.0, 1.0], method="slerp", params={"t": t})
        for name in SHAPES:
            torch.testing.assert_close(merged[name], ft[name])
    # two orthogonal unit vectors: halfway is their normalized sum, of norm 1
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    zero = {"w": torch.zeros(2)}
    merged = merge(zero, [TaskVector.extract(zero, a), TaskVector.extract(zero, b)], [1.0, 1.0], method="slerp", params={"t": 0.5})
    torch.testing.assert_close(merged["w"], torch.tensor([0.5**0.5, 0.5**0.5]))


def test_consensus_drops_entries_that_fewer_than_k_tasks_need():
    zero = {"w": torch.zeros(3)}
    # entry 0: both tasks large; entry 1: only task a; entry 2: only task b
    a, b = {"w": torch.tensor([1.0, 2.0, 0.01])}, {"w": torch.tensor([1.0, 0.01, 3.0])}
    vectors = [TaskVector.extract(zero, a), TaskVector.extract(zero, b)]
    both = merge(zero, vectors, [1.0, 1.0], method="consensus_ta", params={"k": 2, "mask_lambda": 0.5})
    torch.testing.assert_close(both["w"], torch.tensor([2.0, 0.0, 0.0]))
    one = merge(zero, vectors, [1.0, 1.0], method="consensus_ta", params={"k": 1, "mask_lambda": 0.5})
    torch.testing.assert_close(one["w"], torch.tensor([2.0, 2.01, 3.01]))


def test_methods_list_fifteen_methods_each_with_a_summary_and_a_paper():
    assert len(METHODS) == 15
    for m in METHODS.values():
        assert m.summary and "\n" not in m.summary
        assert m.paper is None or m.paper.count(".") == 1
    assert [m.name for m in METHODS.values() if m.paper is None] == ["slerp"]


def test_searchable_parameters_come_from_the_declared_ranges():
    searchable = {m.name: [(p.name, p.low, p.high) for p in m.searchable_params()] for m in METHODS.values()}
    assert searchable["breadcrumbs"] == [("density", 0.0, 1.0), ("gamma", 0.0, 1.0)]
    assert searchable["della"] == [("density", 0.0, 1.0), ("epsilon", 0.0, 0.5)]
    assert searchable["slerp"] == [("t", 0.0, 1.0)]
    assert searchable["iso_cts"] == [("common_fraction", 0.0, 1.0)]
    assert searchable["tsv_m"] == []


# -- per-layer coefficients ------------------------------------------------------------------


def test_a_per_layer_weight_gives_each_tensor_its_first_matching_glob(tmp_path):
    base, fts = random_models(11, 2)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    weight = {"*.bias": 5.0, "sq.*": 0.2, "*": 0.8, "wide.*": 3.0}  # "*" is the default wherever it stands
    merged = merge(base, vectors, [weight, 1.0], method="task_arithmetic", scale={"norm.*": 0.5, "*": 1.0})
    for name, w, scale in [("sq.weight", 0.2, 1.0), ("wide.weight", 3.0, 1.0), ("tall.weight", 0.8, 1.0), ("norm.weight", 0.8, 0.5), ("gain", 0.8, 1.0)]:
        t0, t1 = fts[0][name] - base[name], fts[1][name] - base[name]
        torch.testing.assert_close(merged[name], base[name] + scale * (w * t0 + t1), msg=name)


@pytest.mark.parametrize("method, params", [p for p in NEW_METHODS if p.id in ("tsv_m", "breadcrumbs_ties", "della", "consensus_ties")])
def test_a_per_layer_weight_equals_merging_each_tensor_with_its_number(method, params):
    base, fts = random_models(12, 3)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    per_layer = merge(base, vectors, [{"sq.*": 0.3, "*": 1.1}, 1.0, 0.6], method=method, params=params)
    plain_sq = merge(base, vectors, [0.3, 1.0, 0.6], method=method, params=params)
    plain_rest = merge(base, vectors, [1.1, 1.0, 0.6], method=method, params=params)
    for name in SHAPES:
        assert torch.equal(per_layer[name], (plain_sq if name == "sq.weight" else plain_rest)[name]), name


def test_a_per_layer_weight_is_recorded_in_order_in_the_recipe_digest(tmp_path):
    base, fts = random_models(13, 1)
    base_path, ft_paths = write_set(tmp_path, base, fts)
    one = {"base": str(base_path), "vectors": [{"finetuned": str(ft_paths[0]), "weight": {"sq.*": 0.2, "*.weight": 0.5, "*": 1.0}}]}
    other = {"base": str(base_path), "vectors": [{"finetuned": str(ft_paths[0]), "weight": {"*.weight": 0.5, "sq.*": 0.2, "*": 1.0}}]}
    a, b = parse_recipe(one), parse_recipe(other)
    assert '"weight":[["sq.*",0.2],["*.weight",0.5],["*",1.0]]' in a.canonical_json()
    assert a.sha256() != b.sha256()
    first = compose_to(a, output=tmp_path / "a.safetensors")
    second = compose_to(b, output=tmp_path / "b.safetensors")
    assert first.fingerprint != second.fingerprint  # sq.weight gets 0.2 from one, 0.5 from the other
    assert first.weights == [{"sq.*": 0.2, "*.weight": 0.5, "*": 1.0}]
    meta = open_checkpoint(tmp_path / "a.safetensors").metadata()
    assert meta["taskvec.recipe_sha256"] == a.sha256()


# -- bad merge requests ---------------------------------------------------------------------------


BAD_PARAMS = [
    ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, "params.gamma: density 0.95 + gamma 0.1 = 1.05 is more than 1"),
    ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.2}, "params.gamma: density 0.9 + gamma 0.2 = 1.1 is more than 1"),
    ("della", {"density": 0.2, "epsilon": 0.3}, "params.epsilon: 0.3 with density 0.2 gives keep probabilities from -0.1 to 0.5, not inside (0, 1)"),
    ("della_linear", {"density": 0.8, "epsilon": 0.2}, "params.epsilon: 0.2 with density 0.8 gives keep probabilities from 0.6 to 1, not inside (0, 1)"),
    ("della", {"density": 0.5, "epsilon": 0.6}, "params.epsilon: 0.6 must be a number in [0, 0.5)"),
    ("slerp", {"t": 1.5}, "params.t: 1.5 must be a number in [0, 1]"),
    ("slerp", {"t": -0.1}, "params.t: -0.1 must be a number in [0, 1]"),
    ("iso_cts", {"common_fraction": 1.0}, "params.common_fraction: 1.0 must be a number in (0, 1)"),
    ("iso_cts", {"common_fraction": 0}, "params.common_fraction: 0 must be a number in (0, 1)"),
    ("tsv_m", {"exclude": ["embed.*", 3]}, "params.exclude: ['embed.*', 3] must be a list of glob strings"),
    ("iso_c", {"exclude": "embed.*"}, "params.exclude: 'embed.*' must be a list of glob strings"),
    ("consensus_ta", {"k": 1.5}, "params.k: 1.5 must be an integer in [1, inf)"),
]


@pytest.mark.parametrize("method, params, message", BAD_PARAMS, ids=[f"{m}-{'-'.join(p)}" for m, p, _ in BAD_PARAMS])
def test_bad_parameters_are_refused_in_one_line_and_nothing_is_written(tmp_path, assert_no_output, method, params, message):
    count, weights = inputs_for(method)
    base, fts = random_models(14, count)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    with pytest.raises(TaskVecError) as info:
        merge_to(base, vectors, weights, output=tmp_path / "m.safetensors", method=method, params=params)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert_no_output(tmp_path / "m.safetensors")


@pytest.mark.parametrize("count", [1, 3])
def test_slerp_with_other_than_two_inputs_is_refused_naming_the_count(tmp_path, assert_no_output, count):
    base, fts = random_models(15, count)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    with pytest.raises(TaskVecError, match=f"method 'slerp' merges exactly 2 task vectors, got {count}"):
        merge_to(base, vectors, [1.0] * count, output=tmp_path / "m.safetensors", method="slerp", params={"t": 0.5})
    assert_no_output(tmp_path / "m.safetensors")


@pytest.mark.parametrize(
    "weight, message",
    [
        ({"sq.*": "heavy", "*": 1.0}, "vectors[0].weight['sq.*']: 'heavy' is not a number"),
        ({"sq.*": float("nan"), "*": 1.0}, "vectors[0].weight['sq.*']: nan is not a finite number"),
        ({"sq.*": 0.5, "*.weight": 1.0}, "vectors[0].weight: no glob of ['sq.*', '*.weight'] matches tensor 'gain' (add a '*' default)"),
        ({}, "vectors[0].weight: an empty mapping gives no tensor a value"),
    ],
)
def test_a_bad_per_layer_weight_is_refused_naming_it_and_nothing_is_written(tmp_path, assert_no_output, weight, message):
    base, fts = random_models(16, 1)
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    with pytest.raises(TaskVecError) as info:
        merge_to(base, vectors, [weight], output=tmp_path / "m.safetensors")
    assert str(info.value) == message or str(info.value).startswith(message)
    assert_no_output(tmp_path / "m.safetensors")


# -- what search reads from the declarations ------------------------------------------------------


def search_recipe(method, params, search, weight=1.0):
    return {"base": "base.safetensors", "method": method, "params": params, "search": search,
            "vectors": [{"vector": "a.safetensors", "weight": weight}, {"vector": "b.safetensors"}],
            "evaluation": {"evaluator": "m:f", "tasks": ["a"]}}


def test_the_scale_grid_reaches_two_for_the_isotropic_methods_and_one_otherwise():
    assert parse_recipe(search_recipe("iso_c", {}, {})).search.scale.grid()[-1] == 2.0
    assert len(parse_recipe(search_recipe("iso_cts", {}, {})).search.scale.grid()) == 41
    assert parse_recipe(search_recipe("tsv_m", {}, {})).search.scale.grid()[-1] == 1.0
    given = parse_recipe(search_recipe("iso_c", {}, {"scale": {"low": 0.5, "high": 1.5, "step": 0.5}}))
    assert given.search.scale.grid() == [0.5, 1.0, 1.5]


def test_declared_takes_each_parameters_declared_range():
    one = parse_recipe(search_recipe("della", {"density": 0.5}, {"strategy": "optuna", "params": {"epsilon": "declared", "density": {"low": 0.3, "high": 0.7}}}))
    assert (one.search.params["epsilon"].low, one.search.params["epsilon"].high) == (0.0, math.nextafter(0.5, 0.0))
    assert (one.search.params["density"].low, one.search.params["density"].high) == (0.3, 0.7)
    every = parse_recipe(search_recipe("iso_cts", {}, {"strategy": "optuna", "params": "declared"}))
    assert list(every.search.params) == ["common_fraction"]


@pytest.mark.parametrize(
    "method, params, search, weight, message",
    [
        ("consensus_ta", {}, {"strategy": "optuna", "params": {"k": "declared"}}, 1.0, "search.params.k: consensus_ta declares no search range for 'k' (searchable: mask_lambda)"),
        ("della", {"density": 0.5}, {"params": "declared"}, 1.0, "weights and params ranges are searched by strategy optuna"),
        ("tsv_m", {}, {"strategy": "optuna", "weights": {"low": 0.5, "high": 1.5}}, {"*": 1.0}, "search.weights: vectors[0].weight is per layer"),
    ],
)
def test_a_search_the_declarations_cannot_serve_is_refused(method, params, search, weight, message):
    with pytest.raises(TaskVecError, match=re.escape(message)):
        parse_recipe(search_recipe(method, params, search, weight))


@pytest.mark.parametrize("method, params", NEW_METHODS)
def test_every_later_method_composes_through_the_cli(tmp_path, method, params):
    from click.testing import CliRunner

    from mlflow_taskvec.cli import main as cli

    count, weights = inputs_for(method)
    base, fts = random_models(17, count)
    base_path, ft_paths = write_set(tmp_path, base, fts)
    data = {"base": str(base_path), "method": method, "params": params, "scale": {"norm.*": 0.5, "*": 0.9},
            "vectors": [{"finetuned": str(p), "weight": w} for p, w in zip(ft_paths, weights)]}
    (tmp_path / "recipe.yaml").write_text(json.dumps(data))  # JSON is YAML
    result = CliRunner().invoke(cli, ["compose", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    vectors = [TaskVector.extract(base_path, p) for p in ft_paths]
    expected = merge(base_path, vectors, weights, method=method, params=params, scale=data["scale"])
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(written[n], expected[n]) for n in expected)


def test_della_on_a_matrix_of_more_than_a_random_block_matches_its_reference():
    """Worked a block of rows at a time: the second block starts inside a random block."""
    g = torch.Generator().manual_seed(18)
    shape = (1100, 1000)
    assert shape[0] * shape[1] > RANDOM_BLOCK
    base = {"w": torch.randn(shape, generator=g)}
    fts = [{"w": base["w"] + 0.1 * torch.randn(shape, generator=g)} for _ in range(2)]
    params = {"density": 0.5, "epsilon": 0.3, "seed": 4}
    merged = merge(base, [TaskVector.extract(base, ft) for ft in fts], [1.0, 0.5], method="della_linear", params=params, compute_dtype="float64")
    b64 = base["w"].double()
    expected = b64.clone()
    for i, (ft, w) in enumerate(zip(fts, [1.0, 0.5])):
        t = ft["w"].double() - b64
        ranks = torch.empty_like(t)
        ranks.scatter_(1, torch.argsort(t.abs(), dim=1, stable=True), torch.arange(shape[1], dtype=t.dtype).expand(shape))
        p = 0.5 - 0.3 + 2 * 0.3 * ranks / (shape[1] - 1)
        keep = ref_uniforms(4, i, "w", t.numel()).reshape(shape) < p
        expected += w * torch.where(keep, t / p, 0.0)
    torch.testing.assert_close(merged["w"], expected.float())


@pytest.mark.parametrize("start, length", [(1000, 5000), (RANDOM_BLOCK - 7, 20), (RANDOM_BLOCK + 3, RANDOM_BLOCK)])
def test_a_keep_mask_starting_inside_a_random_block_is_the_slice_of_the_whole_mask(start, length):
    numel = 3 * RANDOM_BLOCK
    ctx = MergeContext(name="w", start=0, numel=numel, params={"seed": 5})
    whole = ref_uniforms(5, 1, "w", numel) < 0.4
    assert torch.equal(ctx.keep_mask(1, length, 0.4, offset=start), whole[start : start + length])


def _ulps_off(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many units in the last place of ``want``'s dtype ``got`` is from ``want``, entry by entry."""
    ulp = (torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=want.dtype)) - want.abs()).double()
    return (got.double() - want.double()).abs() / ulp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method, params", NEW_METHODS)
def test_half_precision_outputs_are_within_two_ulps_of_the_float64_reference(tmp_path, method, params, dtype):
    """16-bit checkpoints in, 16-bit out: each entry is the float64 reference rounded to that dtype,
    give or take 2 units in its last place for the elementwise methods (float32 compute rounds
    before the final cast); the SVD methods, whose float32 decompositions differ from float64
    ones by more than a rounding, within 2 steps of 2^-7 (bf16) or 2^-10 (fp16) relative."""
    count, weights = inputs_for(method)
    base, fts = random_models(4, count, dtype)
    base_path, ft_paths = write_set(tmp_path, base, fts)
    vectors = [TaskVector.extract(base_path, p) for p in ft_paths]
    merge_to(base_path, vectors, weights, output=tmp_path / "m.safetensors", method=method, params=params, scale=0.8)
    merged = load_file(str(tmp_path / "m.safetensors"))
    expected = reference_merge(base, fts, weights, method, 0.8, validate_params(get_method(method), params))
    step = 2**-7 if dtype == torch.bfloat16 else 2**-10
    for name, want in expected.items():
        got = merged[name]
        assert got.dtype == want.dtype, name
        if not want.is_floating_point():
            assert torch.equal(got, want), name
        elif method in SVD_METHODS:
            torch.testing.assert_close(got, want, rtol=2 * step, atol=2 * step, msg=lambda m, n=name: f"{n}: {m}")
        else:
            off = _ulps_off(got, want)
            assert float(off.max()) <= 2, f"{name}: {int((off > 2).sum())} entries more than 2 ulps off (max {float(off.max()):.1f})"


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_on_a_matrix_of_several_row_chunks_matches_its_reference(method):
    """A matrix reaches della in chunks of whole rows (never whole): the per-row ranks and the
    position-keyed masks give the reference's result; the rows per chunk do not divide the random block."""
    width = 1000
    assert not get_method(method).takes_whole_tensor("w", (3000, width), {}) and get_method(method).takes_whole_tensor("n", (3000,), {})
    assert get_method(method).chunk_elements((3000, width)) == (CHUNK_ELEMENTS // width) * width
    g = torch.Generator().manual_seed(8)
    rows = 2 * (CHUNK_ELEMENTS // width) + 37
    base = {"w": torch.randn(rows, width, generator=g)}
    fts = []
    for _ in range(3):  # distinct magnitudes within each row: unambiguous ranks
        magnitude = (torch.argsort(torch.rand(rows, width, generator=g), dim=1) + 1).double() / width * 1e-2
        sign = torch.where(torch.rand(rows, width, generator=g) < 0.5, -1.0, 1.0).double()
        fts.append({"w": (base["w"].double() + sign * magnitude).float()})
    weights = [0.7, 1.2, 0.9]
    params = validate_params(get_method(method), {"density": 0.5, "epsilon": 0.2, "seed": 4})
    merged = merge(base, [TaskVector.extract(base, ft) for ft in fts], weights, method=method, params=params, compute_dtype="float64")
    b64 = base["w"].double()
    dropped = []
    for i, ft in enumerate(fts):
        t = ft["w"].double() - b64
        ranks = torch.empty_like(t)
        ranks.scatter_(1, torch.argsort(t.abs(), dim=1), torch.arange(width, dtype=t.dtype).expand(rows, width))
        p = 0.5 - 0.2 + 2 * 0.2 * ranks / (width - 1)
        keep = ref_uniforms(4, i, "w", t.numel()).reshape(t.shape) < p
        dropped.append(torch.where(keep, t / p, 0.0))
    if method == "della_linear":
        expected = ref_weighted_sum(dropped, weights)
    else:
        expected = ref_elect_and_mean([w * d for w, d in zip(weights, dropped)], weights)
    torch.testing.assert_close(merged["w"], (b64 + expected).float())


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)], ids=["tall", "wide", "square"])
def test_iso_c_with_gram_matches_the_float64_svd_reference_to_1e_4(tmp_path, shape):
    """The opt-in Gram algorithm (no SVD) computes the same formula, mean(S) U V^T of sum_i d_i, to 1e-4
    relative; the default (gram 0) is the SVD's."""
    g = torch.Generator().manual_seed(12)
    base = {"w": torch.randn(shape, generator=g) * 0.02, "n": torch.randn(shape[0], generator=g)}
    fts = [{n: t + torch.randn(t.shape, generator=g) * 1e-3 for n, t in base.items()} for _ in range(3)]
    weights = [0.7, 1.2, 0.9]
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    fast = merge(base, vectors, weights, method="iso_c", scale=0.8, params={"gram": 1})
    default = merge(base, vectors, weights, method="iso_c", scale=0.8)
    ts = [ft["w"].double() - base["w"].double() for ft in fts]
    expected = 0.8 * ref_iso_c([w * t for w, t in zip(weights, ts)])
    for merged in (fast, default):
        delta = merged["w"].double() - base["w"].double()
        assert float((delta - expected).norm() / expected.norm()) < 1e-4
    assert not torch.equal(fast["w"], default["w"])  # another algorithm: other rounding
    assert torch.equal(fast["n"], default["n"])  # what is not a matrix: the mean, either way


def test_iso_c_gram_of_a_rank_deficient_sum_is_finite_and_keeps_its_range():
    g = torch.Generator().manual_seed(13)
    low = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    ctx = MergeContext(name="w", start=0, numel=low.numel(), params={"exclude": [], "gram": 1}, shape=low.shape, whole_tensor=True)
    merged = METHODS["iso_c"].fn([low.float()], [1.0], ctx).double()
    u, s, vh = svd64(low)
    # the three nonzero directions at the mean singular value (of all 30, 27 of them 0); nothing elsewhere
    expected = float(s.mean()) * (u[:, :3] @ vh[:3])
    assert torch.isfinite(merged).all()
    assert float((merged - expected).norm() / expected.norm()) < 1e-4
