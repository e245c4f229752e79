"""The stored layouts' promises (docs/layouts.md, engine/compressed.py's docstring) against
references written from that text, on small real files: what each layout stores, what it
reads back (whole and in chunks that cross block boundaries), the all-zero encoding, and the
one-line refusal of tampered indices. These tests kill the mutants of engine/compressed.py,
engine/lowrank.py and engine/lora.py that ``make mutation`` found alive (docs/mutation.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlflow_taskvec import TaskVecError, TaskVector, open_checkpoint
from mlflow_taskvec.engine import compressed as compressed_module
from mlflow_taskvec.engine.compressed import compress, pack_signs, unpack_signs
from mlflow_taskvec.engine.io import TensorSpec
from mlflow_taskvec.engine.lora import AdapterConfig, adapter_config, is_embedding_module, svd_factors
from mlflow_taskvec.engine import lowrank as lowrank_module
from mlflow_taskvec.engine.lowrank import DenseDelta, LowRankCheckpoint, LowRankTensor, ProductTensor, rank_for_energy

# A vector with a tie-rich vector, a matrix, a matrix of exact zeros (a frozen layer) and a zero bias.
SHAPES = {"a.weight": (6, 5), "b.bias": (11,), "frozen.weight": (4, 3), "frozen.bias": (3,)}


def _delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    delta = {n: torch.randn(*s, generator=g) * 0.1 for n, s in SHAPES.items()}
    delta["b.bias"] = torch.tensor([0.5, -0.25, 0.25, -0.5, 0.0, 0.125, -0.125, 0.5, 0.0, 0.25, -0.0625])  # ties in magnitude
    delta["a.weight"][0, :3] = torch.tensor([0.0, -0.3, 0.3])
    delta["frozen.weight"] = torch.zeros(4, 3)
    delta["frozen.bias"] = torch.zeros(3)
    return delta


@pytest.fixture
def vector(tmp_path):
    """A saved task vector exactly equal to ``_delta()`` (base zero), and that delta."""
    delta = _delta()
    save_file({n: torch.zeros(*s) for n, s in SHAPES.items()}, str(tmp_path / "base.safetensors"))
    save_file(delta, str(tmp_path / "ft.safetensors"))
    TaskVector.extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors").save(tmp_path / "tv.safetensors")
    return TaskVector.load(tmp_path / "tv.safetensors"), delta


def top_k_reference(flat: torch.Tensor, density: float) -> list[int]:
    """``k = max(1, int(density * n))`` indices by descending |value|, the earlier first among ties; ascending."""
    k = max(1, int(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))
    return sorted(order[:k])


def stored(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    return load_file(str(path)), meta


def chunks(ckpt, name: str, size: int) -> torch.Tensor:
    n = ckpt.spec(name).numel
    return torch.cat([ckpt.read_chunk(name, a, min(a + size, n), torch.float32) for a in range(0, n, size)])


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 1.0])
def test_sparse_stores_the_top_k_by_magnitude_and_reads_back_exactly_those_values(vector, tmp_path, density):
    vec, delta = vector
    compress(vec, tmp_path / "s.safetensors", "sparse", density=density)
    parts, meta = stored(tmp_path / "s.safetensors")
    table = json.loads(meta["taskvec.layout_tensors"])
    ckpt = open_checkpoint(tmp_path / "s.safetensors")
    for name in ("a.weight", "b.bias"):
        flat = delta[name].reshape(-1)
        keep = top_k_reference(flat, density)
        assert table[name] == {"dtype": "F32", "shape": list(SHAPES[name]), "encoding": "sparse"}
        assert parts[f"{name}/indices"].dtype == torch.int32 and parts[f"{name}/indices"].tolist() == keep
        assert torch.equal(parts[f"{name}/values"], flat[keep])
        expected = torch.zeros_like(flat)
        expected[keep] = flat[keep]
        assert torch.equal(ckpt.get_tensor(name), expected.reshape(SHAPES[name]))


def test_sign_bits_are_bit_b_of_byte_j_for_entry_8j_plus_b_and_unpack_any_range():
    flat = torch.tensor([0.5, -1.0, 0.0, 2.0, 3.0, -0.5, 1.0, 1.0, -2.0, 4.0, 0.0, 5.0, -1.0])  # 13 entries: 2 bytes
    expected = [sum(1 << b for b in range(8) if 8 * j + b < 13 and float(flat[8 * j + b]) > 0) for j in range(2)]
    packed = pack_signs(flat)
    assert packed.dtype == torch.uint8 and packed.tolist() == expected
    bits = [1 if float(v) > 0 else 0 for v in flat]
    for start in range(13):
        for stop in range(start, 14):
            assert unpack_signs(packed, start, stop).tolist() == bits[start:stop], (start, stop)


def test_bitdelta_reads_back_plus_or_minus_the_float64_mean_magnitude_per_matrix(vector, tmp_path):
    vec, delta = vector
    compress(vec, tmp_path / "b.safetensors", "bitdelta")
    parts, meta = stored(tmp_path / "b.safetensors")
    table = json.loads(meta["taskvec.layout_tensors"])
    ckpt = open_checkpoint(tmp_path / "b.safetensors")
    t = delta["a.weight"]
    scale = float(t.double().abs().mean())
    assert table["a.weight"]["encoding"] == "bitdelta" and parts["a.weight/scale"].shape == ()
    assert parts["a.weight/scale"].item() == torch.tensor(scale, dtype=torch.float32).item()
    assert parts["a.weight/signs"].shape == (4,)  # 30 entries, 8 per byte
    expected = torch.where(t > 0, torch.tensor(scale), torch.tensor(-scale)).float()
    assert torch.equal(ckpt.get_tensor("a.weight"), expected)
    assert table["b.bias"]["encoding"] == "dense" and torch.equal(ckpt.get_tensor("b.bias"), delta["b.bias"])  # not a matrix


@pytest.mark.parametrize("layout, setting", [("sparse", {"density": 0.5}), ("bitdelta", {}), ("lowrank", {"rank": 1})])
def test_an_all_zero_tensor_is_stored_as_its_shape_alone_and_reads_back_exactly_zero(vector, tmp_path, layout, setting):
    vec, _ = vector
    result = compress(vec, tmp_path / "z.safetensors", layout, **setting)
    parts, meta = stored(tmp_path / "z.safetensors")
    table = json.loads(meta["taskvec.layout_tensors"])
    ckpt = open_checkpoint(tmp_path / "z.safetensors")
    for name in ("frozen.weight", "frozen.bias"):
        assert table[name]["encoding"] == "zero" and table[name]["shape"] == list(SHAPES[name])
        assert not any(p.startswith(name + "/") for p in parts)
        value = ckpt.get_tensor(name)
        assert value.shape == SHAPES[name] and value.dtype == torch.float32 and bool((value == 0).all())
        assert torch.equal(ckpt.read_chunk(name, 1, 3, torch.float64), torch.zeros(2, dtype=torch.float64))
    assert result.encodings.get("zero") == 2


@pytest.mark.parametrize("layout, setting", [("sparse", {"density": 0.4}), ("bitdelta", {})])
def test_reads_that_cross_block_boundaries_equal_the_whole_tensor(vector, tmp_path, monkeypatch, layout, setting):
    """Blocks of 7 entries (the block size is the engine's streaming constant; 7 makes a 30-entry
    matrix five blocks): any chunking reads the same values as the whole tensor."""
    vec, delta = vector
    compress(vec, tmp_path / "c.safetensors", layout, **setting)
    whole = {n: open_checkpoint(tmp_path / "c.safetensors").get_tensor(n).reshape(-1) for n in ("a.weight", "b.bias")}
    monkeypatch.setattr(compressed_module, "CHUNK_ELEMENTS", 7)
    ckpt = open_checkpoint(tmp_path / "c.safetensors")
    for name, flat in whole.items():
        assert torch.equal(ckpt.get_tensor(name).reshape(-1), flat), name
        for size in (1, 3, 7, 8, 13):
            assert torch.equal(chunks(ckpt, name, size), flat), (name, size)
        assert ckpt.read_chunk(name, 5, 5, torch.float32).numel() == 0


def _tampered(tmp_path, indices: list[int]):
    """A sparse file whose 'b.bias' indices are replaced (values kept in count)."""
    parts, meta = stored(tmp_path / "s.safetensors")
    parts["b.bias/indices"] = torch.tensor(indices, dtype=torch.int32)
    parts["b.bias/values"] = torch.ones(len(indices))
    save_file(parts, str(tmp_path / "bad.safetensors"), metadata=meta)
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize(
    "indices, problem",
    [
        ([-1, 2, 3], r"has an index outside \[0, 11\) \(first -1, last 3\)"),
        ([0, 2, 11], r"has an index outside \[0, 11\) \(first 0, last 11\)"),
        ([0, 2, 2], r"has indices that are not strictly ascending \(a repeated or unordered index\)"),
        ([0, 3, 2], r"has indices that are not strictly ascending \(a repeated or unordered index\)"),
    ],
    ids=["negative", "past-the-end", "repeated", "unordered"],
)
def test_a_tampered_sparse_index_is_refused_in_one_line_naming_the_tensor(vector, tmp_path, indices, problem):
    vec, _ = vector
    compress(vec, tmp_path / "s.safetensors", "sparse", density=0.25)
    bad = _tampered(tmp_path, indices)
    with pytest.raises(TaskVecError, match=rf"^{bad}: corrupt sparse task vector: tensor 'b.bias' {problem}$"):
        open_checkpoint(bad).get_tensor("b.bias")


def test_valid_edge_indices_read_back(vector, tmp_path):
    vec, _ = vector
    compress(vec, tmp_path / "s.safetensors", "sparse", density=0.25)
    value = open_checkpoint(_tampered(tmp_path, [0, 5, 10])).get_tensor("b.bias")
    assert value.tolist() == [1.0 if i in (0, 5, 10) else 0.0 for i in range(11)]
    assert open_checkpoint(_tampered(tmp_path, [4])).get_tensor("b.bias").tolist() == [1.0 if i == 4 else 0.0 for i in range(11)]


# -- engine/lowrank.py: the canonical densification (docs/layouts.md, "The one low-rank layout") ------


def canonical_reference(left: torch.Tensor, right: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """Every entry ``sum_k left[i, k] * right[k, j]`` accumulated in Python floats (float64) in the
    order k = 0, 1, ..., times ``scaling``, rounded once to ``dtype``."""
    m, r = left.shape
    n = right.shape[1]
    out = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            acc = float(left[i, 0]) * float(right[0, j])
            for k in range(1, r):
                acc += float(left[i, k]) * float(right[k, j])
            out[i, j] = acc * scaling
    return out.to(dtype)


def factors(m: int, r: int, n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("rank", [1, 3])
def test_a_low_rank_tensor_densifies_canonically_whole_and_in_any_chunk(dtype, rank):
    left, right = factors(5, rank, 4)
    t = LowRankTensor((5, 4), rank, 0.75, lambda: left, lambda: right, dtype)
    expected = canonical_reference(left, right, 0.75, dtype)
    assert t.dense().dtype == dtype and torch.equal(t.dense(), expected)
    flat = expected.reshape(-1)
    for start in range(0, 21, 3):
        for stop in (start, start + 1, start + 5, 20):
            if stop <= 20 and stop >= start:
                assert torch.equal(t.chunk(start, stop), flat[start:stop]), (start, stop)
    assert torch.equal(t.rows(2, 4), expected[2:4])


def test_a_rank_zero_tensor_is_zeros_of_its_shape_and_dtype():
    t = LowRankTensor((2, 3, 2), 0, 1.0, dtype=torch.float16)
    assert torch.equal(t.dense(), torch.zeros(2, 3, 2, dtype=torch.float16)) and t.dense().dtype == torch.float16
    assert torch.equal(t.chunk(4, 9), torch.zeros(5, dtype=torch.float16)) and t.chunk(5, 5).numel() == 0


def test_a_dense_delta_is_value_minus_base_plus_the_float64_scaled_addend_rounded_to_its_dtype():
    g = torch.Generator().manual_seed(4)
    value, minus, addend = (torch.randn(3, 4, generator=g) for _ in range(3))
    d = DenseDelta(TensorSpec(torch.float32, (3, 4)), lambda: value, lambda: minus, lambda: addend, 0.3)
    expected = (value - minus) + (addend.double() * 0.3).float()
    assert torch.equal(d.dense(), expected)
    assert torch.equal(d.chunk(2, 9), expected.reshape(-1)[2:9])
    plain = DenseDelta(TensorSpec(torch.float32, (3, 4)), lambda: value)
    assert plain.dense() is value and torch.equal(plain.chunk(1, 5), value.reshape(-1)[1:5])
    only_addend = DenseDelta(TensorSpec(torch.float32, (3, 4)), lambda: value, addend=lambda: addend, scaling=2.0)
    assert torch.equal(only_addend.dense(), value + (addend.double() * 2.0).float())


@pytest.mark.parametrize(
    "singular, energy, rank",
    [
        ([3.0, 2.0, 1.0], 9 / 14, 1),  # exactly the first square's share
        ([3.0, 2.0, 1.0], 0.65, 2),
        ([3.0, 2.0, 1.0], 13 / 14, 2),
        ([3.0, 2.0, 1.0], 1.0, 3),
        ([3.0, 2.0, 1.0], 0.01, 1),
        ([1.0, 0.0, 0.0], 1.0, 1),  # energy 1 keeps every nonzero singular value, no more
        ([0.0, 0.0], 0.9, 0),  # a zero matrix
    ],
)
def test_rank_for_energy_is_the_fewest_leading_singular_values_holding_that_share_of_the_squares(singular, energy, rank):
    squares = [s * s for s in singular]
    total = sum(squares)
    reference = 0 if total == 0 else next(r for r in range(1, len(squares) + 1) if sum(squares[:r]) >= energy * total - 1e-12 * total)
    assert reference == rank
    assert rank_for_energy(torch.tensor(singular), energy) == rank


def test_a_non_finite_factor_or_dense_delta_is_refused_naming_the_part_and_tensor():
    left, right = factors(3, 1, 2)
    bad_left = left.clone()
    bad_left[1, 0] = float("nan")
    good = LowRankTensor((3, 2), 1, 1.0, lambda: left, lambda: right)
    dense = DenseDelta(TensorSpec(torch.float32, (2,)), lambda: torch.tensor([1.0, 2.0]))
    LowRankCheckpoint({"w": good, "z": LowRankTensor((3, 2), 0)}, {"b": dense}, {}, "src").check_finite()  # all finite
    cases = [
        ({"w": LowRankTensor((3, 2), 1, 1.0, lambda: bad_left, lambda: right)}, {}, "left factor of tensor 'w' of src"),
        ({"w": LowRankTensor((3, 2), 1, 1.0, lambda: left, lambda: right * float("inf"))}, {}, "right factor of tensor 'w' of src"),
        ({"w": good}, {"b": DenseDelta(TensorSpec(torch.float32, (2,)), lambda: torch.tensor([1.0, float("inf")]))}, "delta factor of tensor 'b' of src"),
    ]
    for low_rank, dense_deltas, what in cases:
        with pytest.raises(TaskVecError, match=rf"^{what} holds NaN or Inf values"):
            LowRankCheckpoint(low_rank, dense_deltas, {}, "src").check_finite()


# -- engine/lora.py: PEFT's rank and scaling, and the factors export-lora writes (docs/lora-hf.md) ---------


def _config(**fields) -> AdapterConfig:
    values = dict(r=8, lora_alpha=16, use_rslora=False, fan_in_fan_out=False, rank_pattern={}, alpha_pattern={}, base_model_name_or_path=None)
    return AdapterConfig(**(values | fields))


def test_a_module_s_rank_and_scaling_follow_peft_patterns_matched_at_the_end_of_its_name_after_a_dot():
    config = _config(rank_pattern={"q_proj": 4, r"layers\.1\.v_proj": 2}, alpha_pattern={"q_proj": 2})
    assert config.rank_and_scaling("model.layers.0.self_attn.q_proj") == (4, 2 / 4)
    assert config.rank_and_scaling("q_proj") == (4, 2 / 4)
    assert config.rank_and_scaling("model.layers.0.self_attn.xq_proj") == (8, 16 / 8)  # no dot before the pattern
    assert config.rank_and_scaling("model.layers.1.v_proj") == (2, 16 / 2)
    assert config.rank_and_scaling("model.layers.1.v_proj.extra") == (8, 16 / 8)  # the pattern must end the name
    rs = _config(use_rslora=True, rank_pattern={"k": 9})
    assert rs.rank_and_scaling("a.k") == (9, 16 / math.sqrt(9)) and rs.rank_and_scaling("a.q") == (8, 16 / math.sqrt(8))


def test_the_first_matching_pattern_wins():
    config = _config(rank_pattern={"proj": 3, "q_proj": 5})
    assert config.rank_and_scaling("attn.proj") == (3, 16 / 3)
    assert config.rank_and_scaling("attn.q_proj") == (5, 16 / 5)  # 'proj' must follow a dot: only q_proj matches


@pytest.mark.parametrize("rank, energy", [(1, None), (2, None), (5, None), (None, 0.9), (None, 1.0)])
def test_export_factors_are_the_truncated_svd_with_sqrt_s_on_each_side_and_the_eckart_young_residual(rank, energy):
    g = torch.Generator().manual_seed(8)
    delta = torch.randn(6, 4, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(delta)
    squares = [float(v) ** 2 for v in s]
    k = min(rank, 4) if rank is not None else next(r for r in range(1, 5) if sum(squares[:r]) >= energy * sum(squares) - 1e-12)
    b, a, residual = svd_factors(delta, rank, energy, torch.float64)
    assert b.shape == (6, k) and a.shape == (k, 4) and b.dtype == a.dtype == torch.float64
    torch.testing.assert_close(b.T @ b, torch.diag(s[:k]), rtol=0, atol=1e-10)  # U sqrt(S): B^T B = S
    torch.testing.assert_close(a @ a.T, torch.diag(s[:k]), rtol=0, atol=1e-10)  # sqrt(S) Vh: A A^T = S
    assert residual == pytest.approx(sum(squares[k:]), abs=1e-10)
    assert float((delta - b @ a).square().sum()) == pytest.approx(sum(squares[k:]), abs=1e-10)
    b32, a32, _ = svd_factors(delta, rank, energy, torch.float32)
    assert b32.dtype == a32.dtype == torch.float32


def test_the_written_config_has_the_most_common_rank_the_larger_on_a_tie_and_scaling_one_everywhere():
    ranks = {"l.0.q": 4, "l.0.v": 2, "l.1.q": 4, "l.1.v": 2, "embed_tokens": 8}
    r, pattern, config = adapter_config(ranks, "base-model", ["head"])
    assert r == 4 and config["r"] == 4 and config["lora_alpha"] == 4
    assert pattern == {r"l\.0\.v": 2, r"l\.1\.v": 2, "embed_tokens": 8} == config["rank_pattern"] == config["alpha_pattern"]
    assert config["target_modules"] == sorted(ranks) and config["modules_to_save"] == ["head"]
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "base-model"
    assert (config["use_rslora"], config["use_dora"], config["fan_in_fan_out"], config["bias"]) == (False, False, False, "none")
    # an adapter for inference whose deltas are B @ A exactly: no dropout, PEFT's own initialization flag
    assert (config["task_type"], config["lora_dropout"], config["init_lora_weights"], config["inference_mode"]) == (None, 0.0, True, True)
    read = _config(r=config["r"], lora_alpha=config["lora_alpha"], rank_pattern=config["rank_pattern"], alpha_pattern=config["alpha_pattern"])
    for module, rank in ranks.items():
        assert read.rank_and_scaling(module) == (rank, 1.0), module
    assert adapter_config({"a": 2, "b": 3}, None)[0] == 3 and adapter_config({"a": 3, "b": 2, "c": 2}, None)[0] == 2


@pytest.mark.parametrize("module, embedding", [("model.embed_tokens", True), ("transformer.wte", True), ("transformer.wpe", True),
                                               ("model.Embeddings", True), ("embed.layers.0.q_proj", False), ("lm_head", False),
                                               ("transformer.wte_block.q", False)])
def test_modules_whose_last_name_holds_embed_wte_or_wpe_are_embedding_lora(module, embedding):
    assert is_embedding_module(module) is embedding


# -- engine/compressed.py at its edges: float64, empty and 1 x 1 tensors, the size rule, short index lists ----


def _saved_vector(tmp_path, delta: dict[str, torch.Tensor]) -> TaskVector:
    save_file({n: torch.zeros_like(t) for n, t in delta.items()}, str(tmp_path / "base64.safetensors"))
    save_file(delta, str(tmp_path / "ft64.safetensors"))
    return TaskVector.extract(tmp_path / "base64.safetensors", tmp_path / "ft64.safetensors")


def test_a_float64_vector_is_ranked_and_read_back_in_float64(tmp_path):
    """Magnitudes that only float64 tells apart: the larger is kept, and its value reads back exactly."""
    flat = torch.tensor([1.0, 1.0 + 1e-12, 0.5, -0.25, 1e-300, 0.0], dtype=torch.float64)
    vec = _saved_vector(tmp_path, {"w": flat.reshape(2, 3)})
    compress(vec, tmp_path / "s.safetensors", "sparse", density=1 / 6)  # k = 1
    parts, _ = stored(tmp_path / "s.safetensors")
    assert parts["w/indices"].tolist() == [1] and parts["w/values"].dtype == torch.float64
    compress(vec, tmp_path / "s3.safetensors", "sparse", density=0.7)  # k = 4: 1e-300 is the smallest kept
    value = open_checkpoint(tmp_path / "s3.safetensors").get_tensor("w")
    assert value.dtype == torch.float64 and value.reshape(-1).tolist() == [1.0, 1.0 + 1e-12, 0.5, -0.25, 0.0, 0.0]


def test_an_empty_tensor_compresses_to_an_empty_tensor_in_every_layout(tmp_path):
    vec = _saved_vector(tmp_path, {"empty": torch.zeros(0, 3), "w": torch.tensor([[0.5, -1.0], [2.0, 0.25]])})
    for layout, setting in (("sparse", {"density": 0.5}), ("bitdelta", {}), ("lowrank", {"rank": 1})):
        compress(vec, tmp_path / f"{layout}.safetensors", layout, **setting)
        value = open_checkpoint(tmp_path / f"{layout}.safetensors").get_tensor("empty")
        assert value.shape == (0, 3), layout


def test_a_one_by_one_matrix_is_bitdelta_encoded_as_every_matrix_is(tmp_path):
    vec = _saved_vector(tmp_path, {"one": torch.tensor([[-0.75]]), "w": torch.tensor([[0.5, -1.0], [2.0, 0.25]])})
    compress(vec, tmp_path / "b.safetensors", "bitdelta")
    _, meta = stored(tmp_path / "b.safetensors")
    assert json.loads(meta["taskvec.layout_tensors"])["one"]["encoding"] == "bitdelta"
    assert open_checkpoint(tmp_path / "b.safetensors").get_tensor("one").tolist() == [[-0.75]]


def test_factors_exactly_as_large_as_the_matrix_are_not_smaller_so_it_is_stored_dense(tmp_path):
    g = torch.Generator().manual_seed(2)
    vec = _saved_vector(tmp_path, {"square": torch.randn(4, 4, generator=g), "wide": torch.randn(4, 12, generator=g)})
    compress(vec, tmp_path / "l.safetensors", "lowrank", rank=2)  # 2 * (4 + 4) = 16 = 4 * 4; 2 * (4 + 12) = 32 < 48
    _, meta = stored(tmp_path / "l.safetensors")
    table = json.loads(meta["taskvec.layout_tensors"])
    assert table["square"]["encoding"] == "dense" and table["wide"]["encoding"] == "lowrank" and table["wide"]["rank"] == 2


def test_two_sparse_indices_out_of_order_are_refused_and_sign_bits_unpack_as_uint8(vector, tmp_path):
    vec, _ = vector
    compress(vec, tmp_path / "s.safetensors", "sparse", density=0.25)
    for indices in ([4, 4], [6, 2]):
        bad = _tampered(tmp_path, indices)
        with pytest.raises(TaskVecError, match=r"tensor 'b.bias' has indices that are not strictly ascending"):
            open_checkpoint(bad).get_tensor("b.bias")
    assert unpack_signs(pack_signs(torch.tensor([1.0, -1.0, 2.0])), 0, 3).dtype == torch.uint8


def test_a_format_1_product_reads_the_same_values_in_any_chunking_across_blocks(monkeypatch):
    """Format 1's ``lowrank`` tensor is the plain product ``B @ A`` in the stored dtype, computed
    for the rows of each fixed block (a block size of 7 here, so a 5 x 4 tensor is three blocks)."""
    monkeypatch.setattr(lowrank_module, "CHUNK_ELEMENTS", 7)
    left, right = factors(5, 2, 4)
    t = ProductTensor((5, 4), 2, 1.0, lambda: left, lambda: right, torch.float32)
    whole = t.dense()
    assert whole.shape == (5, 4) and whole.dtype == torch.float32
    torch.testing.assert_close(whole, (left.double() @ right.double()).float(), rtol=0, atol=1e-6)
    flat = whole.reshape(-1)
    for start in range(21):
        for stop in range(start, 21):
            assert torch.equal(t.chunk(start, stop), flat[start:stop]), (start, stop)
    zero = ProductTensor((2, 3), 0, 1.0, dtype=torch.float16)
    assert torch.equal(zero.dense(), torch.zeros(2, 3, dtype=torch.float16)) and zero.chunk(2, 2).numel() == 0


def test_zero_and_empty_chunks_keep_the_tensor_s_dtype():
    for cls in (LowRankTensor, ProductTensor):
        zero = cls((2, 3), 0, 1.0, dtype=torch.float16)
        assert zero.chunk(1, 4).dtype == torch.float16 and zero.chunk(2, 2).dtype == torch.float16, cls


def test_a_format_1_product_with_a_block_ending_one_entry_into_a_row(monkeypatch):
    """3 columns and blocks of 7: the first block ends one entry into row 2, whose product it still needs."""
    monkeypatch.setattr(lowrank_module, "CHUNK_ELEMENTS", 7)
    left, right = factors(5, 2, 3)
    t = ProductTensor((5, 3), 2, 1.0, lambda: left, lambda: right, torch.float32)
    torch.testing.assert_close(t.dense(), (left.double() @ right.double()).float(), rtol=0, atol=1e-6)
    assert torch.equal(t.chunk(5, 9), t.dense().reshape(-1)[5:9])


@pytest.mark.parametrize("singular, energy, rank", [([1.0, 1e-4], 0.999999995, 2), ([1.0, 1.0], 0.5 + 1e-9, 2), ([1.0, 1.0], 0.5, 1)])
def test_rank_for_energy_sums_and_compares_in_float64(singular, energy, rank):
    """Shares that float32 rounds onto the threshold: 1 / (1 + 1e-8) and an energy just above 1/2."""
    assert rank_for_energy(torch.tensor(singular, dtype=torch.float32), energy) == rank


def test_a_dense_delta_reads_in_its_spec_s_dtype_and_a_non_finite_first_entry_is_refused():
    value, minus = torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([0.5, 0.25], dtype=torch.float64)
    d = DenseDelta(TensorSpec(torch.float32, (2,)), lambda: value, lambda: minus)
    assert d.chunk(0, 2).dtype == torch.float32 and d.chunk(0, 2).tolist() == [0.5, 1.75]
    assert DenseDelta(TensorSpec(torch.float32, (2,)), lambda: value).chunk(0, 2).dtype == torch.float32
    first_bad = DenseDelta(TensorSpec(torch.float32, (2,)), lambda: torch.tensor([float("nan"), 1.0]))
    with pytest.raises(TaskVecError, match=r"^delta factor of tensor 'b' of src holds NaN or Inf values"):
        LowRankCheckpoint({}, {"b": first_bad}, {}, "src").check_finite()


FORMAT1_LORA = Path(__file__).parent / "fixtures" / "format1" / "lora.safetensors"


def _lora_format1(tmp_path, table_edit=None, drop=None, add=None):
    """The format-1 ``lora`` fixture with its ``taskvec.low_rank`` table or its tensors edited."""
    tensors = load_file(str(FORMAT1_LORA))
    with safe_open(str(FORMAT1_LORA), "pt") as fh:
        meta = dict(fh.metadata())
    table = json.loads(meta["taskvec.low_rank"])
    if table_edit:
        table_edit(table)
    meta["taskvec.low_rank"] = json.dumps(table)
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "case, problem",
    [
        ("shape", "has shape [12, -1], not a list of whole numbers >= 0"),
        ("rank", "has rank 11, not a whole number in [0, 10]"),
        ("scaling", "has scaling 'x', not a finite number"),
        ("factor", "lacks its factor 'layer.weight.lowrank_right'"),
        ("both", "is stored both dense and as factors"),
    ],
)
def test_a_tampered_format_1_lora_file_is_one_line_naming_the_file_and_the_tensor(tmp_path, case, problem):
    """docs/layouts.md: ``PATH: corrupt LAYOUT task vector: tensor 'NAME' ...``."""
    edits = {
        "shape": dict(table_edit=lambda t: t["layer.weight"].update(shape=[12, -1])),
        "rank": dict(table_edit=lambda t: t["layer.weight"].update(rank=11)),
        "scaling": dict(table_edit=lambda t: t["layer.weight"].update(scaling="x")),
        "factor": dict(drop="layer.weight.lowrank_right"),
        "both": dict(add={"frozen.weight": torch.zeros(6, 8)}),
    }
    name = "frozen.weight" if case == "both" else "layer.weight"
    path = _lora_format1(tmp_path, **edits[case])
    with pytest.raises(TaskVecError) as err:
        open_checkpoint(path)
    assert str(err.value) == f"{path}: corrupt lora task vector: tensor {name!r} {problem}"


def test_a_format_1_lora_file_reads_its_dense_tensors_whatever_their_names_and_counts_its_stored_bytes(tmp_path):
    """Every tensor the table does not claim is a dense delta (here one sorting after the
    factors); the stored size is the bytes of the factors and dense tensors in the file."""
    extra = torch.arange(4.0)
    path = _lora_format1(tmp_path, add={"z.bias": extra})
    ckpt = open_checkpoint(path)
    assert torch.equal(ckpt.get_tensor("z.bias"), extra)
    assert sorted(ckpt.keys()) == ["frozen.weight", "head.bias", "layer.weight", "z.bias"]
    # factors 12 x 3 and 3 x 10, head.bias (10) and z.bias (4), all float32
    assert ckpt.stored_bytes == (36 + 30 + 10 + 4) * 4
    assert [Path(p) for p in ckpt.files] == [path]  # what a copy copies


def test_a_non_finite_format_1_lora_factor_is_refused_naming_the_file(tmp_path):
    left = load_file(str(FORMAT1_LORA))["layer.weight.lowrank_left"].clone()
    left[0, 0] = float("nan")
    path = _lora_format1(tmp_path, add={"layer.weight.lowrank_left": left})
    with pytest.raises(TaskVecError, match="tensor 'layer.weight' of " + str(path).replace(".", r"\.")):
        open_checkpoint(path).check_finite()


# -- engine/lowrank.py's writer and reader of the low-rank layout (docs/layouts.md) -------------

FORMAT1_LOWRANK = Path(__file__).parent / "fixtures" / "format1" / "lowrank.safetensors"


def _factors(m: int, n: int, r: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(m * 100 + n * 10 + r)
    return torch.randn(m, r, generator=g).to(dtype), torch.randn(r, n, generator=g).to(dtype)


def _low_rank_vector(tensors: dict[str, LowRankTensor]) -> LowRankCheckpoint:
    return LowRankCheckpoint(tensors, {}, {}, "handmade")


def test_the_writer_keeps_a_full_rank_tensor_factored_reports_each_name_and_never_overwrites_by_default(tmp_path):
    left, right = _factors(3, 5, 3)  # rank 3 = min(3, 5): the largest a 3 x 5 matrix has
    vec = _low_rank_vector({"w": LowRankTensor((3, 5), 3, 0.5, lambda: left, lambda: right)})
    seen = []
    lowrank_module.save_low_rank(vec, tmp_path / "v.safetensors", {}, progress=seen.append)
    assert seen == ["w"]
    parts, meta = stored(tmp_path / "v.safetensors")
    assert json.loads(meta["taskvec.layout_tensors"])["w"] == {"dtype": "F32", "shape": [3, 5], "encoding": "lowrank", "rank": 3, "scaling": 0.5}
    assert torch.equal(parts["w/left"], left) and torch.equal(parts["w/right"], right)
    before = (tmp_path / "v.safetensors").read_bytes()
    with pytest.raises(TaskVecError):
        lowrank_module.save_low_rank(vec, tmp_path / "v.safetensors", {})
    assert (tmp_path / "v.safetensors").read_bytes() == before


def test_the_writer_refuses_a_rank_above_the_smaller_side_in_one_line(tmp_path):
    left, right = _factors(2, 3, 3)
    vec = _low_rank_vector({"w": LowRankTensor((2, 3), 3, 1.0, lambda: left, lambda: right)})
    with pytest.raises(TaskVecError) as err:
        lowrank_module.save_low_rank(vec, tmp_path / "v.safetensors", {})
    assert str(err.value) == "handmade: tensor 'w' of shape [2, 3] cannot have rank 3 (at most 2)"
    assert not (tmp_path / "v.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_zero_tensor_reads_back_in_its_recorded_dtype(tmp_path, dtype):
    vec = _low_rank_vector({"z": LowRankTensor((2, 3), 0, dtype=dtype)})
    lowrank_module.save_low_rank(vec, tmp_path / "v.safetensors", {})
    got = open_checkpoint(tmp_path / "v.safetensors").get_tensor("z")
    assert got.dtype == dtype and torch.equal(got, torch.zeros(2, 3, dtype=dtype))


def test_format_2_factors_may_be_stored_in_another_float_dtype_than_the_tensor(tmp_path):
    """An adapter's factors are saved as the adapter had them (bfloat16 on a float32 base)."""
    left, right = _factors(4, 3, 2, torch.bfloat16)
    vec = _low_rank_vector({"w": LowRankTensor((4, 3), 2, 1.0, lambda: left, lambda: right, dtype=torch.float32)})
    lowrank_module.save_low_rank(vec, tmp_path / "v.safetensors", {})
    got = open_checkpoint(tmp_path / "v.safetensors").get_tensor("w")
    expected = (left.double() @ right.double()).float()
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def _tampered_lowrank_format1(tmp_path, edit_table=None, edit_tensors=None, edit_meta=None):
    tensors, meta = stored(FORMAT1_LOWRANK)
    table = json.loads(meta["taskvec.layout_tensors"])
    if edit_table:
        edit_table(table)
    meta["taskvec.layout_tensors"] = json.dumps(table)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "edit, problem",
    [
        (dict(edit_tensors=lambda t: t.pop("layer.weight/A")), "tensor 'layer.weight' lacks its stored part 'A'"),
        (dict(edit_tensors=lambda t: t.update({"layer.weight/B": t["layer.weight/B"].double()})), "tensor 'layer.weight' has part 'B' of shape [12, 2] (float64), expected [12, 2] (float32)"),
        (dict(edit_table=lambda t: t["head.bias"].update(encoding="lowrank")), "tensor 'head.bias' is low-rank with shape [10]: only a matrix has factors"),
    ],
    ids=["no A", "B in another dtype", "1-D low-rank"],
)
def test_a_tampered_format_1_lowrank_file_is_one_line_naming_the_file_and_the_tensor(tmp_path, edit, problem):
    path = _tampered_lowrank_format1(tmp_path, **edit)
    with pytest.raises(TaskVecError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: corrupt lowrank task vector: {problem}") and "\n" not in message


def test_a_low_rank_file_of_a_newer_format_asks_for_an_upgrade(tmp_path):
    path = _tampered_lowrank_format1(tmp_path, edit_meta=lambda m: m.update({"taskvec.layout_format": "3"}))
    with pytest.raises(TaskVecError) as err:
        open_checkpoint(path)
    assert str(err.value) == f"{path}: low-rank layout format '3' is newer than this version reads (1 or 2): upgrade mlflow-taskvec"


@pytest.mark.parametrize("rank", [1, 10])
def test_a_format_1_lowrank_file_of_rank_1_or_of_the_smaller_side_reads_the_product(tmp_path, rank):
    b, a = _factors(12, 10, rank)
    path = _tampered_lowrank_format1(tmp_path, edit_tensors=lambda t: t.update({"layer.weight/B": b, "layer.weight/A": a}))
    assert torch.allclose(open_checkpoint(path).get_tensor("layer.weight"), b @ a, rtol=0, atol=1e-5)


def test_a_format_1_lowrank_part_a_that_is_not_a_matrix_is_refused_naming_its_shape(tmp_path):
    path = _tampered_lowrank_format1(tmp_path, edit_tensors=lambda t: t.update({"layer.weight/A": torch.zeros(10)}))
    with pytest.raises(TaskVecError) as err:
        open_checkpoint(path)
    assert str(err.value) == f"{path}: corrupt lowrank task vector: tensor 'layer.weight' has part 'A' of shape [10]: its rank is not in [1, 10]"


def test_a_format_1_lowrank_file_saved_again_keeps_its_values_and_its_files(tmp_path):
    old = open_checkpoint(FORMAT1_LOWRANK)
    TaskVector.load(FORMAT1_LOWRANK).save(tmp_path / "new.safetensors")
    new = open_checkpoint(tmp_path / "new.safetensors")
    assert json.loads(stored(tmp_path / "new.safetensors")[1]["taskvec.layout_tensors"])["layer.weight"]["scaling"] == 1.0
    assert torch.allclose(new.get_tensor("layer.weight"), old.get_tensor("layer.weight"), rtol=0, atol=1e-6)
    assert [Path(p) for p in new.files] == [tmp_path / "new.safetensors"]  # what a copy copies


def test_the_writer_overwrites_when_told_and_never_writes_over_its_own_input(tmp_path):
    left, right = _factors(3, 5, 2)
    vec = _low_rank_vector({"w": LowRankTensor((3, 5), 2, 1.0, lambda: left, lambda: right)})
    path = tmp_path / "v.safetensors"
    lowrank_module.save_low_rank(vec, path, {})
    lowrank_module.save_low_rank(vec, path, {}, overwrite=True)
    again = open_checkpoint(path)
    with pytest.raises(TaskVecError):
        lowrank_module.save_low_rank(again, path, {}, overwrite=True, inputs=[again])
    assert torch.equal(open_checkpoint(path).get_tensor("w"), (left.double() @ right.double()).float())
