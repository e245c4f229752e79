"""The merge methods' formulas of docs/methods.md, at the edges the float64 references of
test_methods.py and test_methods_sota.py do not reach: rounding rules, thresholds, counts.
Expected values are worked out by hand from the text (or computed in float64 with
``math``). These tests kill the mutants of engine/methods/ that ``make mutation`` found
alive (docs/mutation.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from mlflow_taskvec import TaskVector
from mlflow_taskvec.engine.merging import merge
from mlflow_taskvec.engine.methods.breadcrumbs import band_counts, check_band, prepare_band
from mlflow_taskvec.engine.methods.consensus import consensus_mask
from mlflow_taskvec.engine.methods.della import check_probabilities, keep_probabilities, rank_norm
from mlflow_taskvec.engine.methods.isotropic import iso_cts_split
from mlflow_taskvec.engine.methods.slerp import slerp_vectors
from mlflow_taskvec.engine.methods.trim import top_k_rule, trim_threshold
from mlflow_taskvec.errors import TaskVecError


@pytest.mark.parametrize(
    "r, tasks, fraction, expected",
    [
        (10, 4, 0.8, (10, 0)),  # c = 8; (10 - 8) / 4 = 0.5 rounds to 0 (half to even): c = 10
        (10, 4, 0.4, (2, 2)),  # c = 4; 6 / 4 = 1.5 rounds to 2: c = 10 - 8
        (9, 2, 0.5, (5, 2)),  # c = 4; 5 / 2 = 2.5 rounds to 2 (half to even): c = 9 - 4
        (5, 2, 0.5, (1, 2)),  # c = 2; 3 / 2 = 1.5 rounds to 2: c = 5 - 4
        (7, 2, 0.5, (3, 2)),  # c = 3; 4 / 2 = 2 exactly
        (6, 4, 0.5, (2, 1)),  # c = 3; 3 / 4 = 0.75 rounds to 1
        (3, 4, 0.1, (3, 0)),  # c = 0; 3 / 4 rounds to 1: c = -1 < 0, so c = 3 mod 4
        (2, 5, 0.9, (2, 0)),  # c = 1; 1 / 5 rounds to 0: c = 2
        (8, 3, 0.3, (2, 2)),  # c = 2; 6 / 3 = 2: c = 2
    ],
)
def test_iso_cts_splits_r_into_c_common_and_s_per_task_directions_as_documented(r, tasks, fraction, expected):
    c, s = iso_cts_split(r, tasks, fraction)
    assert (c, s) == expected and c + tasks * s == r


def slerp_reference(v1: list[float], v2: list[float], t: float) -> list[float]:
    """docs/methods.md's slerp in Python floats."""
    n1, n2 = math.sqrt(sum(a * a for a in v1)), math.sqrt(sum(b * b for b in v2))
    if n1 == 0 or n2 == 0:
        return [(1 - t) * a + t * b for a, b in zip(v1, v2)]
    cos = max(-1.0, min(1.0, sum(a * b for a, b in zip(v1, v2)) / (n1 * n2)))
    if abs(cos) > 0.9995:
        return [(1 - t) * a + t * b for a, b in zip(v1, v2)]
    theta = math.acos(cos)
    return [math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b for a, b in zip(v1, v2)]


def pair_at_cosine(cos: float) -> tuple[list[float], list[float]]:
    """Two vectors of norms 2 and 3 whose cosine is ``cos``."""
    return [2.0, 0.0, 0.0], [3.0 * cos, 3.0 * math.sqrt(1 - cos * cos), 0.0]


@pytest.mark.parametrize("cos", [0.9996, 0.9994, 0.99, 0.5, 0.0, -0.5, -0.9994, -0.9996])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_is_spherical_unless_the_cosine_exceeds_0_9995_in_magnitude(cos, t):
    v1, v2 = pair_at_cosine(cos)
    got = slerp_vectors(torch.tensor(v1, dtype=torch.float64), torch.tensor(v2, dtype=torch.float64), t)
    assert got.tolist() == pytest.approx(slerp_reference(v1, v2, t), abs=1e-12)


def test_slerp_near_the_threshold_differs_from_the_linear_interpolation():
    """The rows above can tell the two branches apart: at cos 0.9994 slerp is not lerp."""
    v1, v2 = pair_at_cosine(0.9994)
    lerp = [(0.5) * a + 0.5 * b for a, b in zip(v1, v2)]
    assert max(abs(a - b) for a, b in zip(slerp_reference(v1, v2, 0.5), lerp)) > 1e-6


@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
def test_slerp_with_a_zero_vector_is_the_linear_interpolation(t):
    zero, v = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert slerp_vectors(zero, v, t).tolist() == pytest.approx((v * t).tolist(), abs=1e-15)
    assert slerp_vectors(v, zero, t).tolist() == pytest.approx((v * (1 - t)).tolist(), abs=1e-15)


def test_slerp_at_a_cosine_of_exactly_0_9995_is_still_spherical():
    """|cos| > 0.9995 is linear; at 0.9995 itself the formula is the spherical one."""
    v1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = math.sqrt(1 - 0.9995**2)
    for _ in range(200):  # the neighbour of b whose computed cosine is exactly 0.9995
        v2 = torch.tensor([0.9995, b], dtype=torch.float64)
        cos = float(torch.dot(v1, v2)) / (float(torch.linalg.vector_norm(v1)) * float(torch.linalg.vector_norm(v2)))
        if cos == 0.9995:
            break
        b = math.nextafter(b, math.inf if cos > 0.9995 else -math.inf)
    assert cos == 0.9995
    theta = math.acos(0.9995)
    expected = [math.sin(0.5 * theta) / math.sin(theta) * (x + y) for x, y in zip(v1.tolist(), v2.tolist())]
    lerp = [0.5 * (x + y) for x, y in zip(v1.tolist(), v2.tolist())]
    got = slerp_vectors(v1, v2, 0.5).tolist()
    assert got == pytest.approx(expected, abs=1e-14) and max(abs(g - e) for g, e in zip(got, lerp)) > 1e-6


@pytest.mark.parametrize("density, epsilon, refused", [(0.3, 0.3, True), (0.7, 0.3, True), (0.3, 0.29, False), (0.5, 0.49, False)])
def test_della_refuses_an_epsilon_that_puts_a_keep_probability_at_0_or_1(density, epsilon, refused):
    if refused:
        with pytest.raises(TaskVecError, match=rf"^params\.epsilon: {epsilon:g} with density {density:g} gives keep probabilities"):
            check_probabilities({"density": density, "epsilon": epsilon})
    else:
        check_probabilities({"density": density, "epsilon": epsilon})


def test_della_ranks_equal_magnitudes_by_position_the_earlier_lower_in_long_rows():
    row = torch.tensor([1.0, -0.5, 1.0, 0.5, -1.0] * 400)  # 2000 entries, three magnitudes tied 800/400/800 ways
    n = row.numel()
    order = sorted(range(n), key=lambda i: (abs(float(row[i])), i))
    expected = torch.empty(n)
    for rank, i in enumerate(order):
        expected[i] = rank / (n - 1)
    got = rank_norm(row.abs().reshape(1, -1)).reshape(-1)
    assert torch.equal(got, expected)
    assert torch.equal(rank_norm(torch.tensor([[3.0]])), torch.tensor([[0.5]]))  # a single entry


@pytest.mark.parametrize("shape", [(7,), (2, 2, 3)])
def test_della_ranks_a_tensor_that_is_not_a_matrix_as_one_row(shape):
    t = torch.arange(1.0, 1.0 + math.prod(shape)).reshape(shape) * torch.tensor([1.0, -1.0]).repeat(math.prod(shape))[: math.prod(shape)].reshape(shape)
    flat = t.reshape(-1).tolist()
    n = len(flat)
    order = sorted(range(n), key=lambda i: (abs(flat[i]), i))
    rank = {i: r for r, i in enumerate(order)}
    expected = torch.tensor([0.4 - 0.1 + 2 * 0.1 * rank[i] / (n - 1) for i in range(n)]).reshape(shape)
    got = keep_probabilities(t, 0.4, 0.1)
    assert got.shape == shape and torch.allclose(got, expected, atol=1e-7, rtol=0)


def test_a_task_mask_keeps_an_entry_whose_magnitude_equals_lambda_times_the_rest():
    """``m_i = |d_i| >= mask_lambda * |t_MTL - d_i|``: equality counts."""
    d1, d2 = torch.tensor([1.0, 0.25, 3.0]), torch.tensor([2.0, 1.5, -3.0])
    total = d1 + d2  # [3, 1.75, 0]
    # entry 0: |d1| = 1 = 0.5 * |3 - 1| (equal), |d2| = 2 >= 0.5 * 1: both; entry 1: 0.25 < 0.75,
    # 1.5 >= 0.125: one; entry 2: 3 >= 0.5 * 3 for each: both
    assert consensus_mask([d1, d2], [1.0, 1.0], total, 2, 0.5).tolist() == [1.0, 0.0, 1.0]
    assert consensus_mask([d1, d2], [1.0, 1.0], total, 1, 0.5).tolist() == [1.0, 1.0, 1.0]


def test_ties_trims_float64_vectors_by_their_float64_magnitudes():
    base = {"w": torch.zeros(3, dtype=torch.float64)}
    vector = TaskVector.extract(base, {"w": torch.tensor([1.0, 1.0 + 1e-12, 0.1], dtype=torch.float64)})
    merged = merge(base, [vector], [1.0], method="ties", params={"density": 1 / 3}, compute_dtype="float64")["w"]
    assert merged.tolist() == [0.0, 1.0 + 1e-12, 0.0]  # k = 1: the larger by 1e-12, which float32 cannot see


def test_a_weight_of_two_scales_d_i_in_ties_and_in_the_svd_methods():
    """``d_i = w_i t_i``: ties of one input with weight 2 is ``2 t / |2| = t``; iso_c of it is
    ``mean(S) U V^T`` of ``2 t``."""
    g = torch.Generator().manual_seed(6)
    base = {"m": torch.zeros(4, 3, dtype=torch.float64)}
    t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    vector = TaskVector.extract(base, {"m": t})
    ties = merge(base, [vector], [2.0], method="ties", params={"density": 1.0}, compute_dtype="float64")["m"]
    torch.testing.assert_close(ties, t, rtol=0, atol=1e-15)
    u, s, vh = torch.linalg.svd(2 * t, full_matrices=False)
    iso = merge(base, [vector], [2.0], method="iso_c", compute_dtype="float64")["m"]
    torch.testing.assert_close(iso, s.mean() * (u @ vh), rtol=0, atol=1e-12)


# -- the trim step and the breadcrumbs band, straight on the engine's rules, whole and in chunks --

# magnitudes tied 4, 3 and 2 ways, a zero, and one outlier (14 entries)
TIED = [0.5, -0.25, 0.25, -0.5, 0.0, 0.125, -0.125, 0.5, 0.0, 0.25, -0.0625, 0.5, -0.25, 1.0]


def chunked(flat: torch.Tensor, size: int):
    """``chunks()`` -> (start, chunk) in order, as the streaming engine gives an input."""
    return lambda: ((s, flat[s : s + size]) for s in range(0, flat.numel(), size))


def top_k_mask(values: list[float], k: int) -> list[bool]:
    """docs/methods.md's ``ties`` trim: the k entries of largest |x|, the earlier first among equals."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    kept = set(order[:k])
    return [i in kept for i in range(len(values))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_trim_keeps_exactly_k_entries_the_earlier_first_among_equal_magnitudes(dtype):
    flat = torch.tensor(TIED, dtype=dtype)
    for k in (2, 3, 7, 13):  # 1, 2, 2 and 1 of 4, 4, 4 and 2 equal magnitudes kept
        expected = top_k_mask(TIED, k)
        for size in (14, 5):  # one chunk, and chunks that split the ties
            rule = top_k_rule(chunked(flat, size), k, dtype)
            kept = torch.cat([rule.apply(c, s) for s, c in chunked(flat, size)()])
            assert kept.tolist() == [x if keep else 0.0 for x, keep in zip(TIED, expected)], (k, size)
        whole = trim_threshold(None, k, dtype, whole=flat)  # one tensor, no tie plan (compress's sparse indices)
        assert whole.keep_mask(flat).tolist() == expected, k


def test_the_trim_of_float64_chunks_compares_float64_magnitudes_against_a_float64_threshold():
    e = 1e-12  # below float32's resolution at 1
    values = [1 + e, 1 + e / 2, 1 + e, 0.5, 1 + e, 1 + 2 * e, 0.25, 1 + e]
    flat = torch.tensor(values, dtype=torch.float64)
    expected = top_k_mask(values, 3)  # 1 + 2e, then the first two of the four 1 + e
    assert expected == [True, False, True, False, False, True, False, False]
    for size in (8, 3):
        rule = top_k_rule(chunked(flat, size), 3, torch.float64)
        kept = torch.cat([rule.apply(c, s) for s, c in chunked(flat, size)()])
        assert kept.tolist() == [x if keep else 0.0 for x, keep in zip(values, expected)], size
    assert trim_threshold(None, 3, torch.float64, whole=flat).keep_mask(flat).tolist() == expected


def test_the_trim_keeps_the_largest_entries_whatever_the_low_bits_of_their_floats():
    """Magnitudes whose float32 low 16 bits are all ones (the last bin of each radix digit)."""
    top, second = (float(torch.tensor([b], dtype=torch.int32).view(torch.float32)) for b in (0x3F80FFFF, 0x3F80FFFE))
    values = [0.5, -top, 0.25, second, -0.75, 1.0]
    for k in (1, 2):
        expected = top_k_mask(values, k)
        for dtype in (torch.float32, torch.float64):
            flat = torch.tensor(values, dtype=dtype)
            for size in (6, 4):
                rule = top_k_rule(chunked(flat, size), k, dtype)
                kept = torch.cat([rule.apply(c, s) for s, c in chunked(flat, size)()])
                assert kept.tolist() == [x if keep else 0.0 for x, keep in zip(values, expected)], (k, dtype, size)
            assert trim_threshold(None, k, dtype, whole=flat).keep_mask(flat).tolist() == expected, (k, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_sparse_trim_ranks_16_bit_tensors_by_their_own_magnitudes(dtype):
    """compress --format sparse ranks a stored 16-bit vector as it is (engine/compressed.py)."""
    values = [0.5, -0.25, 0.25, -0.5, 0.0, 0.125, -0.125, 0.5, 0.0]  # 9 entries: odd, so no view pairs them
    flat = torch.tensor(values, dtype=dtype)
    for k in (2, 4, 6):
        assert trim_threshold(None, k, dtype, whole=flat).keep_mask(flat).tolist() == top_k_mask(values, k), k


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_trim_of_a_chunk_holding_inf_keeps_the_earlier_ties_too(k):
    values = [1.0, -2.0, float("inf"), 2.0, -2.0, 1.0, 0.5]
    flat = torch.tensor(values)
    expected = top_k_mask(values, k)
    rule = top_k_rule(chunked(flat, 7), k, torch.float32)
    assert rule.apply(flat, 0).tolist() == [x if keep else 0.0 for x, keep in zip(values, expected)]


def test_a_trim_at_a_threshold_of_zero_marks_only_the_earliest_zeros_kept():
    values = [0.0, 0.5, 0.0, -0.5, 0.0, 0.0, 0.25, 0.0]
    flat = torch.tensor(values)
    for k in (4, 5, 6):
        expected = top_k_mask(values, k)
        assert trim_threshold(None, k, torch.float32, whole=flat).keep_mask(flat).tolist() == expected
        rule = top_k_rule(chunked(flat, 3), k, torch.float32)
        assert torch.cat([rule.keep_mask(c, s) for s, c in chunked(flat, 3)()]).tolist() == expected


def test_keep_mask_of_a_later_chunk_keeps_its_ties_when_every_tie_is_kept():
    values = [0.5, 0.1, 0.5, 0.2, 0.5, 0.5, 0.1, 0.3]  # the top 4 by magnitude are exactly the four 0.5s
    flat = torch.tensor(values)
    expected = top_k_mask(values, 4)
    rule = top_k_rule(chunked(flat, 3), 4, torch.float32)
    assert rule.keeps_every_tie
    assert torch.cat([rule.keep_mask(c, s) for s, c in chunked(flat, 3)()]).tolist() == expected
    assert torch.cat([rule.apply(c, s) for s, c in chunked(flat, 3)()]).tolist() == [x if keep else 0.0 for x, keep in zip(values, expected)]


def band_reference(values: list[float], density: float, gamma: float) -> list[float]:
    """docs/methods.md's breadcrumbs band: ascending ranks [bottom, bottom + keep) stay."""
    n = len(values)
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = sorted(range(n), key=lambda i: (abs(values[i]), -i))  # equal magnitudes: the earlier higher
    kept = set(order[bottom : bottom + keep])
    return [x if i in kept else 0.0 for i, x in enumerate(values)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_breadcrumbs_band_keeps_the_documented_ranks_whole_and_in_chunks(dtype):
    flat = torch.tensor(TIED, dtype=dtype)
    for density, gamma in ((0.5, 0.1), (0.25, 0.0), (0.86, 0.14), (0.5, 0.5), (0.05, 0.3)):
        for size in (14, 5):
            (band,) = prepare_band("t", flat.numel(), {"density": density, "gamma": gamma}, [chunked(flat, size)], dtype)
            got = torch.cat([band.apply(c, s) for s, c in chunked(flat, size)()])
            assert got.tolist() == band_reference(TIED, density, gamma), (density, gamma, size)


def test_the_breadcrumbs_band_ranks_float64_inputs_by_their_float64_magnitudes():
    values = [1.0, 1.0 + 1e-12, 0.5, 1.0 + 2e-12]  # equal in float32
    flat = torch.tensor(values, dtype=torch.float64)
    for size in (4, 2):
        (band,) = prepare_band("t", 4, {"density": 0.5, "gamma": 0.0}, [chunked(flat, size)], torch.float64)
        got = torch.cat([band.apply(c, s) for s, c in chunked(flat, size)()])
        assert got.tolist() == [0.0, 1.0 + 1e-12, 0.0, 1.0 + 2e-12], size


def test_breadcrumbs_takes_density_plus_gamma_of_exactly_one_and_refuses_more():
    check_band({"density": 0.5, "gamma": 0.5})
    with pytest.raises(TaskVecError, match=r"^params\.gamma: density 0\.6 \+ gamma 0\.5 = 1\.1 is more than 1 \(the kept band and the dropped outliers cannot cover more than every entry\)$"):
        check_band({"density": 0.6, "gamma": 0.5})


def test_band_counts_are_int_of_density_and_gamma_times_n_and_the_rest_below():
    assert band_counts(10, 0.5, 0.5) == (5, 5, 0)
    assert band_counts(10, 0.35, 0.1) == (3, 1, 6)
    assert band_counts(7, 0.99, 0.0) == (6, 0, 1)


def _della_reference(t: torch.Tensor, density: float, epsilon: float, seed: int, name: str) -> torch.Tensor:
    """docs/methods.md: p = density - epsilon + 2 epsilon rank/(n-1) per row (ranks ascending, the
    earlier lower among equal magnitudes); keep where DARE's draw (block b of RANDOM_BLOCK entries:
    torch.rand from manual_seed(derive_seed(seed, input, name, b))) is under p; kept entries / p."""
    from mlflow_taskvec.engine.streaming import RANDOM_BLOCK as DRAW_BLOCK, derive_seed

    rows = t.reshape(-1, t.shape[-1]) if t.dim() == 2 else t.reshape(1, -1)
    n = rows.shape[1]
    p = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        order = sorted(range(n), key=lambda j: (abs(float(rows[i, j])), j))
        for rank, j in enumerate(order):
            p[i, j] = density - epsilon + 2 * epsilon * (rank / (n - 1) if n > 1 else 0.5)
    numel = t.numel()
    draws = torch.cat([torch.rand(min(DRAW_BLOCK, numel - b * DRAW_BLOCK), generator=torch.Generator().manual_seed(derive_seed(seed, 0, name, b))).double()
                       for b in range(math.ceil(numel / DRAW_BLOCK))])
    flat_p = p.reshape(-1)
    return torch.where(draws < flat_p, t.reshape(-1) / flat_p, torch.zeros(())).reshape(t.shape)


@pytest.mark.parametrize("block", [10, 7, 1, 1 << 20])
def test_della_in_blocks_of_rows_of_any_size_draws_each_entry_at_its_own_offset(monkeypatch, block):
    """della_merge works a block of about RANDOM_BLOCK entries at a time; the masks are the whole
    tensor's whatever the block (a small block here: 7 x 5 is cut into blocks of 2, 1 or 1 rows)."""
    from mlflow_taskvec.engine.methods import METHODS, MergeContext
    from mlflow_taskvec.engine.methods import della as della_module

    g = torch.Generator().manual_seed(4)
    t = torch.randn(7, 5, generator=g, dtype=torch.float64)
    params = {"density": 0.5, "epsilon": 0.2, "seed": 3}
    expected = _della_reference(t, 0.5, 0.2, 3, "w")
    monkeypatch.setattr(della_module, "RANDOM_BLOCK", block)

    whole = METHODS["della_linear"].fn([t], [1.0], MergeContext(name="w", start=0, numel=35, params=params, shape=(7, 5), whole_tensor=True))
    rows = METHODS["della_linear"].fn([t.reshape(-1)[10:]], [1.0], MergeContext(name="w", start=10, numel=35, params=params, shape=(7, 5)))

    assert torch.allclose(whole, expected, rtol=1e-12, atol=0)
    assert torch.allclose(rows, expected.reshape(-1)[10:], rtol=1e-12, atol=0)
