"""Compressed task vectors: each layout against a float64 reference written from its
formula, composing from them, fingerprints, sizes, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlflow_taskvec import TaskVecError, TaskVector, merge_to, open_checkpoint
from mlflow_taskvec.cli import main
from mlflow_taskvec.engine.compressed import CompressedCheckpoint, compress, pack_signs, unpack_signs
from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS


def _model(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) for n, s in shapes.items()}


SHAPES = {"embed.weight": (24, 10), "layer.weight": (16, 16), "layer.bias": (16,), "norm.weight": (10,)}


@pytest.fixture
def vector(tmp_path):
    """A saved task vector whose matrices are low-rank plus noise (as fine-tunes' deltas are) and
    whose entries include exact ties; returns (path, {name: float64 tensor})."""
    base = _model(0, SHAPES)
    g = torch.Generator().manual_seed(1)
    delta = {}
    for name, shape in SHAPES.items():
        if len(shape) == 2:
            u, v = torch.randn(shape[0], 3, generator=g), torch.randn(3, shape[1], generator=g)
            delta[name] = (u @ v + 0.05 * torch.randn(*shape, generator=g)) * 0.01
        else:
            delta[name] = torch.randn(*shape, generator=g) * 0.01
    base["layer.bias"][:8] = 1.0  # so that ft - base is exactly the delta there:
    delta["layer.bias"][:6] = 0.125  # eight exact ties in magnitude, the largest entries
    delta["layer.bias"][6:8] = -0.125
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({n: base[n] + delta[n] for n in base}, str(tmp_path / "ft.safetensors"))
    path = tmp_path / "tv.safetensors"
    TaskVector.extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors").save(path)
    return path, {n: t.double() for n, t in load_file(str(path)).items()}


def _dense(path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {n: ckpt.get_tensor(n) for n in ckpt.keys()}


# -- the formulas -------------------------------------------------------------------


def test_sparse_keeps_exactly_the_top_k_by_magnitude_first_in_order_among_ties(vector, tmp_path):
    path, tensors = vector
    compress(TaskVector.load(path), tmp_path / "s.safetensors", "sparse", density=0.25)

    dense = _dense(tmp_path / "s.safetensors")
    for name, t in tensors.items():
        flat = t.reshape(-1)
        k = max(1, int(0.25 * flat.numel()))
        # reference: sort by (-|x|, index) and keep the first k
        order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:k]
        expected = torch.zeros_like(flat)
        expected[order] = flat[order]
        assert torch.equal(dense[name].double().reshape(-1), expected), name
    # the ties: bias has 16 entries, k = 4 of the eight tied at 0.125 survive, the first four
    assert dense["layer.bias"][:8].tolist() == [0.125] * 4 + [0.0] * 4


def test_sparse_stores_ascending_int32_indices_and_their_values(vector, tmp_path):
    path, tensors = vector
    compress(TaskVector.load(path), tmp_path / "s.safetensors", "sparse", density=0.1)

    stored = load_file(str(tmp_path / "s.safetensors"))
    idx, values = stored["embed.weight/indices"], stored["embed.weight/values"]
    assert idx.dtype == torch.int32 and len(idx) == int(0.1 * 240)
    assert torch.all(idx[1:] > idx[:-1])
    assert torch.equal(values.double(), tensors["embed.weight"].reshape(-1)[idx.long()])


def test_bitdelta_is_the_sign_times_the_mean_magnitude_per_matrix_and_keeps_vectors_dense(vector, tmp_path):
    path, tensors = vector
    compress(TaskVector.load(path), tmp_path / "b.safetensors", "bitdelta")

    dense = _dense(tmp_path / "b.safetensors")
    for name, t in tensors.items():
        if t.dim() == 2:
            scale = t.abs().mean()  # float64, from the formula
            expected = torch.where(t > 0, scale, -scale)
            assert torch.equal(dense[name], expected.float()), name
        else:
            assert torch.equal(dense[name].double(), t), name
    stored = load_file(str(tmp_path / "b.safetensors"))
    assert stored["layer.weight/signs"].dtype == torch.uint8 and stored["layer.weight/signs"].numel() == 256 // 8
    assert "layer.bias/dense" in stored


def test_sign_bits_are_packed_eight_per_byte_lowest_bit_first():
    values = torch.tensor([1.0, -1.0, 2.0, 3.0, -1.0, 0.0, -2.0, 5.0, 4.0])

    packed = pack_signs(values)

    assert packed.tolist() == [0b10001101, 0b00000001]  # 0 counts as not positive
    assert unpack_signs(packed, 0, 9).tolist() == [1, 0, 1, 1, 0, 0, 0, 1, 1]
    assert unpack_signs(packed, 3, 9).tolist() == [1, 0, 0, 0, 1, 1]


def test_lowrank_rank_is_the_truncated_svd_of_each_matrix(vector, tmp_path):
    path, tensors = vector
    compress(TaskVector.load(path), tmp_path / "l.safetensors", "lowrank", rank=3)

    dense = _dense(tmp_path / "l.safetensors")
    stored = load_file(str(tmp_path / "l.safetensors"))
    for name, t in tensors.items():
        if t.dim() == 2:
            u, s, vh = torch.linalg.svd(t, full_matrices=False)
            expected = (u[:, :3] * s[:3]) @ vh[:3]  # float64 reference
            torch.testing.assert_close(dense[name].double(), expected, rtol=0, atol=1e-6)
            assert stored[f"{name}/right"].shape == (3, t.shape[1]) and stored[f"{name}/left"].shape == (t.shape[0], 3)
        else:
            assert torch.equal(dense[name].double(), t)


def test_lowrank_energy_keeps_the_fewest_singular_values_holding_that_fraction(vector, tmp_path):
    path, tensors = vector
    compress(TaskVector.load(path), tmp_path / "l.safetensors", "lowrank", energy=0.9)

    stored = load_file(str(tmp_path / "l.safetensors"))
    for name in ("embed.weight", "layer.weight"):
        s2 = torch.linalg.svdvals(tensors[name]) ** 2
        r = next(i + 1 for i in range(len(s2)) if float(s2[: i + 1].sum()) >= 0.9 * float(s2.sum()))
        assert stored[f"{name}/right"].shape[0] == r


def test_lowrank_density_is_the_fraction_of_the_dense_size(vector, tmp_path):
    path, _ = vector
    result = compress(TaskVector.load(path), tmp_path / "l.safetensors", "lowrank", density=0.3)

    stored = load_file(str(tmp_path / "l.safetensors"))
    assert stored["embed.weight/right"].shape[0] == int(0.3 * 24 * 10 / (24 + 10))  # 2
    assert stored["layer.weight/right"].shape[0] == int(0.3 * 16 * 16 / 32)  # 2
    assert result.encodings == {"lowrank": 2, "dense": 2}


def test_a_matrix_whose_factors_are_not_smaller_is_stored_dense(vector, tmp_path):
    path, tensors = vector
    result = compress(TaskVector.load(path), tmp_path / "l.safetensors", "lowrank", rank=9)  # 9 * 32 > 256

    assert open_checkpoint(tmp_path / "l.safetensors").rank("layer.weight") is None  # dense
    assert torch.equal(_dense(tmp_path / "l.safetensors")["layer.weight"].double(), tensors["layer.weight"])
    assert result.encodings == {"dense": 4}  # embed.weight too: 9 * (24 + 10) > 240


# -- one vector like any other ------------------------------------------------------


@pytest.mark.parametrize("layout, setting", [("sparse", {"density": 0.2}), ("bitdelta", {}), ("lowrank", {"rank": 2})])
def test_its_fingerprint_is_the_densified_vectors_and_composing_from_it_equals_composing_from_that(vector, tmp_path, layout, setting):
    path, _ = vector
    result = compress(TaskVector.load(path), tmp_path / "c.safetensors", layout, **setting)
    compressed = TaskVector.load(tmp_path / "c.safetensors")
    densified_fp = compressed.save(tmp_path / "densified.safetensors")

    assert result.fingerprint == densified_fp == open_checkpoint(tmp_path / "c.safetensors").fingerprint()
    assert result.fingerprint != open_checkpoint(path).fingerprint()
    assert result.source_fingerprint is None
    base = tmp_path / "base.safetensors"
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.5})):
        a = merge_to(base, [compressed, TaskVector.load(path)], [1.0, 0.5], tmp_path / f"a-{method}.safetensors", method=method, params=params)
        b = merge_to(base, [TaskVector.load(tmp_path / "densified.safetensors"), TaskVector.load(path)], [1.0, 0.5],
                     tmp_path / f"b-{method}.safetensors", method=method, params=params)
        assert a.fingerprint == b.fingerprint, method


def test_a_recipe_composes_from_a_compressed_vector(vector, tmp_path):
    from mlflow_taskvec.compose import compose_to
    from mlflow_taskvec.recipe import load_recipe

    path, _ = vector
    compress(TaskVector.load(path), tmp_path / "c.safetensors", "sparse", density=0.5)
    TaskVector.load(tmp_path / "c.safetensors").save(tmp_path / "densified.safetensors")
    for name, vec in (("from-compressed", "c.safetensors"), ("from-densified", "densified.safetensors")):
        (tmp_path / f"{name}.yaml").write_text(f"base: base.safetensors\nscale: 0.7\nvectors:\n  - {{vector: {vec}}}\noutput: {name}.safetensors\n")
    fingerprints = [compose_to(load_recipe(tmp_path / f"{n}.yaml")).fingerprint for n in ("from-compressed", "from-densified")]

    assert fingerprints[0] == fingerprints[1]


def test_large_tensors_densify_block_by_block_with_the_same_bits_for_any_chunking(tmp_path):
    shapes = {"big.weight": (1100, 2400)}  # 2.64M entries: three blocks
    base = _model(2, shapes)
    g = torch.Generator().manual_seed(3)
    ft = {"big.weight": base["big.weight"] + (torch.randn(1100, 4, generator=g) @ torch.randn(4, 2400, generator=g)) * 1e-3}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    vec = TaskVector.extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors")
    for layout, setting in (("sparse", {"density": 0.05}), ("bitdelta", {}), ("lowrank", {"rank": 4})):
        out = tmp_path / f"{layout}.safetensors"
        compress(vec, out, layout, **setting)
        ckpt = open_checkpoint(out)
        whole = ckpt.get_tensor("big.weight").reshape(-1)
        odd = torch.cat([ckpt.read_chunk("big.weight", a, min(a + 777_777, whole.numel()), torch.float32) for a in range(0, whole.numel(), 777_777)])
        assert torch.equal(odd, whole), layout
        if layout != "lowrank":  # the low-rank layout computes the rows a chunk touches, and keeps nothing
            assert len(ckpt._blocks) <= CompressedCheckpoint._KEPT_BLOCKS
        assert whole.numel() > 2 * CHUNK_ELEMENTS
    torch.testing.assert_close(open_checkpoint(tmp_path / "lowrank.safetensors").get_tensor("big.weight"), vec.get_tensor("big.weight"), rtol=0, atol=1e-6)


def test_sizes_stored_and_dense(vector, tmp_path):
    path, tensors = vector
    result = compress(TaskVector.load(path), tmp_path / "b.safetensors", "bitdelta")

    dense = sum(t.numel() for t in tensors.values()) * 4
    stored = (240 + 7) // 8 + 4 + 256 // 8 + 4 + 16 * 4 + 10 * 4  # two matrices' bits and scales, two dense vectors
    assert (result.dense_bytes, result.stored_bytes) == (dense, stored)
    assert result.ratio == pytest.approx(dense / stored)


# -- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, setting, message",
    [
        ("bitdelta", {"density": 0.1}, "density: the bitdelta format takes no setting"),
        ("sparse", {"rank": 4}, "rank: the sparse format takes density"),
        ("sparse", {}, "density: the sparse format needs exactly one of density"),
        ("lowrank", {"rank": 2, "energy": 0.9}, "density: the lowrank format needs exactly one of density, rank, energy"),
        ("sparse", {"density": 0.0}, "density: 0.0 must be a number in (0, 1]"),
        ("lowrank", {"energy": 1.5}, "energy: 1.5 must be a number in (0, 1]"),
        ("lowrank", {"rank": 0}, "rank: 0 must be a positive whole number"),
        ("zip", {}, "layout: 'zip' is not one of sparse, bitdelta, lowrank"),
    ],
)
def test_a_setting_that_does_not_fit_the_format_is_refused_before_anything_is_written(vector, tmp_path, layout, setting, message):
    path, _ = vector
    with pytest.raises(TaskVecError) as err:
        compress(TaskVector.load(path), tmp_path / "c.safetensors", layout, **setting)
    assert str(err.value) == message
    assert not list(tmp_path.glob("*c.safetensors*"))


def test_a_compressed_file_missing_a_part_is_refused_by_name(vector, tmp_path):
    path, _ = vector
    compress(TaskVector.load(path), tmp_path / "c.safetensors", "sparse", density=0.5)
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as fh:
        meta = fh.metadata()
    stored = load_file(str(tmp_path / "c.safetensors"))
    del stored["layer.weight/values"]
    save_file(stored, str(tmp_path / "broken.safetensors"), metadata=meta)

    with pytest.raises(TaskVecError, match=r"corrupt sparse task vector: tensor 'layer.weight' lacks its stored part 'values'"):
        TaskVector.load(tmp_path / "broken.safetensors")


# -- command line -------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_compress_writes_the_layout_and_inspect_shows_stored_and_dense_size(vector, tmp_path):
    path, tensors = vector
    out = tmp_path / "c.safetensors"

    result = _cli("compress", path, "--format", "lowrank", "--rank", "2", "-o", out)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"compressed vector: {out}"
    assert lines[1] == "format: lowrank (rank 2)  tensors: 2 dense, 2 lowrank"
    dense = sum(t.numel() for t in tensors.values()) * 4
    stored = 4 * (2 * (24 + 10) + 2 * (16 + 16) + 16 + 10)
    assert lines[2] == f"size: {stored} bytes stored, {dense} dense ({dense / stored:.1f}x smaller)"
    assert lines[3] == f"source fingerprint: {open_checkpoint(path).fingerprint()}"
    assert lines[4] == f"fingerprint: {open_checkpoint(out).fingerprint()}"
    assert open_checkpoint(out).metadata()["taskvec.source_fingerprint"] == open_checkpoint(path).fingerprint()

    shown = _cli("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert "kind: task_vector" in shown.output.splitlines()
    assert "layout: lowrank" in shown.output.splitlines()
    assert f"size: {stored} bytes stored, {dense} dense ({dense / stored:.1f}x smaller)" in shown.output.splitlines()
    as_json = json.loads(_cli("inspect", out, "--format", "json").output)
    assert (as_json["layout"], as_json["stored_bytes"], as_json["dense_bytes"]) == ("lowrank", stored, dense)
    assert as_json["num_parameters"] == sum(t.numel() for t in tensors.values())


def test_cli_compress_refuses_a_setting_of_another_format_in_one_line(vector, tmp_path):
    path, _ = vector
    result = _cli("compress", path, "--format", "bitdelta", "--rank", "2", "-o", tmp_path / "c.safetensors")

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: --rank: the bitdelta format takes no setting"]
    assert not (tmp_path / "c.safetensors").exists()


def test_cli_compress_refuses_a_checkpoint_that_is_not_a_task_vector(vector, tmp_path):
    result = _cli("compress", tmp_path / "base.safetensors", "--format", "bitdelta", "-o", tmp_path / "c.safetensors")

    assert result.exit_code == 1
    assert "not a task vector" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c.safetensors").exists()


def test_a_folder_output_holds_the_layout_and_opens_as_the_dense_vector(vector, tmp_path):
    path, tensors = vector
    result = compress(TaskVector.load(path), tmp_path / "folder", "bitdelta")

    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["model.safetensors"]
    ckpt = open_checkpoint(tmp_path / "folder")
    assert isinstance(ckpt, CompressedCheckpoint) and ckpt.keys() == sorted(tensors)
    assert ckpt.fingerprint() == result.fingerprint
