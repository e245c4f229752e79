"""Stored layouts: the registry, the one low-rank layout, files of format 1, and tampered files.

Format-1 files (tests/fixtures/format1/, written by the version before the one
low-rank layout, see tests/fixtures/make_format1_fixtures.py) must read with the
fingerprints and bytes that version gave. A tampered file must end in one line
naming what is wrong, before any value is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlflow_taskvec import TaskVector, open_checkpoint
from mlflow_taskvec.cli import main
from mlflow_taskvec.engine import checkpoint
from mlflow_taskvec.engine.checkpoint import SafetensorsCheckpoint, StateDictCheckpoint, known_layouts, register_layout
from mlflow_taskvec.engine.compressed import compress
from mlflow_taskvec.engine.lowrank import LowRankCheckpoint, LowRankTensor, save_low_rank
from mlflow_taskvec.errors import TaskVecError

FORMAT1 = Path(__file__).parent / "fixtures" / "format1"
LAYOUTS = {"sparse": {"density": 0.3}, "bitdelta": {}, "lowrank": {"rank": 2}}


def _bytes_sha(ckpt, name: str) -> str:
    return hashlib.sha256(bytes(ckpt.raw_bytes(name))).hexdigest()


def _vector(folder: Path, base: dict, finetuned: dict) -> TaskVector:
    """``finetuned - base``, both saved as safetensors files in ``folder``."""
    save_file(base, str(folder / "base.safetensors"))
    save_file(finetuned, str(folder / "ft.safetensors"))
    return TaskVector.extract(folder / "base.safetensors", folder / "ft.safetensors")


# -- format 1 still reads as it did ---------------------------------------------------------


@pytest.mark.parametrize("name", ["sparse", "bitdelta", "lowrank", "lora"])
def test_files_of_format_1_read_with_the_fingerprints_and_bytes_they_had(name):
    expected = json.loads((FORMAT1 / "expected.json").read_text())[f"{name}.safetensors"]
    ckpt = open_checkpoint(FORMAT1 / f"{name}.safetensors")
    assert ckpt.fingerprint(fresh=True) == expected["fingerprint"]
    assert {n: _bytes_sha(ckpt, n) for n in ckpt.keys()} == expected["tensors"]
    assert TaskVector.load(FORMAT1 / f"{name}.safetensors").task == "fixture"


def test_format_1_low_rank_files_are_read_as_the_one_low_rank_layout():
    for name in ("lowrank", "lora"):
        ckpt = open_checkpoint(FORMAT1 / f"{name}.safetensors")
        assert isinstance(ckpt, LowRankCheckpoint)
        assert ckpt.rank("layer.weight") == (2 if name == "lowrank" else 3) and ckpt.rank("frozen.weight") == 0
        assert ckpt.rank("head.bias") is None  # dense


def test_a_format_1_lora_file_saved_again_is_format_2_with_the_same_fingerprint(tmp_path):
    old = TaskVector.load(FORMAT1 / "lora.safetensors")
    fingerprint = old.save(tmp_path / "again.safetensors")
    again = open_checkpoint(tmp_path / "again.safetensors")
    meta = again.metadata()
    assert (meta["taskvec.layout"], meta["taskvec.layout_format"]) == ("lowrank", "2") and "taskvec.low_rank" not in meta
    assert fingerprint == again.fingerprint(fresh=True) == old.terms[0].stored.fingerprint()
    stored = load_file(str(tmp_path / "again.safetensors"))
    assert sorted(stored) == ["head.bias/dense", "layer.weight/left", "layer.weight/right"]


# -- the one low-rank layout: canonical densification ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_low_rank_tensors_densify_as_float64_sums_in_order_rounded_once(dtype, tmp_path):
    g = torch.Generator().manual_seed(1)
    spread = 10.0 ** torch.randint(-4, 5, (1, 48), generator=g)  # magnitudes far apart: the order of the sum shows
    left, right = (torch.randn(64, 48, generator=g) * spread).to(dtype), torch.randn(48, 60, generator=g).to(dtype)
    ckpt = LowRankCheckpoint({"w": LowRankTensor((64, 60), 48, 0.5, lambda: left, lambda: right, dtype=dtype)}, {}, {}, "mem")
    save_low_rank(ckpt, tmp_path / "v.safetensors", {})
    stored = open_checkpoint(tmp_path / "v.safetensors")
    # the reference, written from the formula: sum over k in order, in float64, times the scaling, rounded once
    acc = torch.zeros(64, 60, dtype=torch.float64)
    for k in range(48):
        acc += left[:, k : k + 1].double() * right[k : k + 1, :].double()
    expected = (acc * 0.5).to(dtype)
    assert stored.spec("w").dtype == dtype
    assert torch.equal(stored.get_tensor("w"), expected)
    pieces = torch.cat([stored.read_chunk("w", a, min(a + 77, 3840), dtype) for a in range(0, 3840, 77)])
    assert torch.equal(pieces, expected.reshape(-1))  # any chunking, the same bits


def test_compress_lowrank_writes_the_one_low_rank_layout(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"a.weight": torch.randn(20, 16, generator=g), "b.bias": torch.randn(16, generator=g)}
    ft = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()}
    vec = _vector(tmp_path, base, ft)
    result = compress(vec, tmp_path / "c.safetensors", "lowrank", rank=3)
    ckpt = open_checkpoint(tmp_path / "c.safetensors")
    table = json.loads(ckpt.metadata()["taskvec.layout_tensors"])
    assert table["a.weight"] == {"dtype": "F32", "encoding": "lowrank", "rank": 3, "scaling": 1.0, "shape": [20, 16]}
    assert table["b.bias"] == {"dtype": "F32", "encoding": "dense", "shape": [16]}
    assert json.loads(ckpt.metadata()["taskvec.layout_params"]) == {"rank": 3}
    stored = load_file(str(tmp_path / "c.safetensors"))
    u, s, vh = torch.linalg.svd(vec.get_tensor("a.weight").reshape(20, 16), full_matrices=False)
    torch.testing.assert_close(stored["a.weight/left"] @ stored["a.weight/right"], (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-6)
    assert result.fingerprint == ckpt.fingerprint(fresh=True)
    assert result.stored_bytes == (20 * 3 + 3 * 16 + 16) * 4 and result.dense_bytes == (20 * 16 + 16) * 4


@pytest.mark.parametrize("layout", ["sparse", "bitdelta", "lowrank"])
def test_an_all_zero_tensor_reads_back_exactly_zero_and_stores_nothing(layout, tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"frozen.weight": torch.randn(8, 6, generator=g), "moved.weight": torch.randn(8, 6, generator=g)}
    ft = {"frozen.weight": base["frozen.weight"].clone(), "moved.weight": base["moved.weight"] + 0.25}
    vec = _vector(tmp_path, base, ft)
    result = compress(vec, tmp_path / "c.safetensors", layout, **LAYOUTS[layout])
    ckpt = open_checkpoint(tmp_path / "c.safetensors")
    zero = ckpt.get_tensor("frozen.weight")
    assert zero.shape == (8, 6) and torch.equal(zero, torch.zeros(8, 6)) and not zero.signbit().any()
    assert torch.equal(ckpt.read_chunk("frozen.weight", 5, 40, torch.float64), torch.zeros(35, dtype=torch.float64))
    assert not [k for k in load_file(str(tmp_path / "c.safetensors")) if k.startswith("frozen.weight")]
    assert result.encodings["zero"] == 1
    assert bool(ckpt.get_tensor("moved.weight").any())


def test_a_zero_tensor_of_the_lora_format_1_file_reads_exactly_zero():
    ckpt = open_checkpoint(FORMAT1 / "lora.safetensors")
    assert torch.equal(ckpt.get_tensor("frozen.weight"), torch.zeros(6, 8))


# -- the registry of layouts ----------------------------------------------------------------


def test_an_unknown_layout_is_one_line_naming_the_known_ones(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"), metadata={"taskvec.layout": "zstd"})
    with pytest.raises(TaskVecError) as err:
        open_checkpoint(tmp_path / "x.safetensors")
    assert str(err.value) == (
        f"{tmp_path / 'x.safetensors'}: unknown stored layout 'zstd' in its taskvec.layout metadata (known: bitdelta, lora, lowrank, sparse)"
    )


def test_a_new_layout_is_one_registration(tmp_path):
    """A layout that stores every tensor doubled, read back halved: one reader, one registration."""

    def halved(stored: SafetensorsCheckpoint) -> StateDictCheckpoint:
        return StateDictCheckpoint({n: stored.get_tensor(n) / 2 for n in stored.keys()}, stored.source, stored.metadata())

    register_layout("test-doubled", halved)
    try:
        save_file({"w": torch.tensor([2.0, 4.0])}, str(tmp_path / "d.safetensors"), metadata={"taskvec.layout": "test-doubled"})
        assert "test-doubled" in known_layouts()
        assert torch.equal(open_checkpoint(tmp_path / "d.safetensors").get_tensor("w"), torch.tensor([1.0, 2.0]))
        with pytest.raises(ValueError, match="already has a reader"):
            register_layout("test-doubled", lambda stored: stored)
    finally:
        checkpoint._LAYOUT_READERS.pop("test-doubled")


# -- tampered files: one line each, before any value is used ---------------------------------


@pytest.fixture(scope="module")
def stored_files(tmp_path_factory):
    """A vector with a 2-D and a 1-D tensor, compressed in every layout: {layout: (tensors, metadata)}."""
    tmp = tmp_path_factory.mktemp("tamper")
    g = torch.Generator().manual_seed(4)
    base = {"layer.weight": torch.randn(12, 10, generator=g), "head.bias": torch.randn(10, generator=g)}
    ft = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()}
    vec = _vector(tmp, base, ft)
    out = {}
    for layout, setting in LAYOUTS.items():
        compress(vec, tmp / f"{layout}.safetensors", layout, **setting)
        with safe_open(str(tmp / f"{layout}.safetensors"), "pt") as fh:
            meta = fh.metadata()
        out[layout] = (load_file(str(tmp / f"{layout}.safetensors")), meta)
    return out


def _table_edit(key, **changes):
    def edit(tensors, meta):
        table = json.loads(meta["taskvec.layout_tensors"])
        table[key].update(changes)
        meta["taskvec.layout_tensors"] = json.dumps(table)

    return edit


def _tensor_edit(key, make):
    def edit(tensors, meta):
        tensors[key] = make(tensors.get(key))

    return edit


TAMPERED = [
    ("sparse", "negative index", _tensor_edit("layer.weight/indices", lambda t: torch.cat([torch.tensor([-1], dtype=t.dtype), t[1:]])),
     "tensor 'layer.weight' has an index outside [0, 120)"),
    ("sparse", "duplicate index", _tensor_edit("layer.weight/indices", lambda t: torch.cat([t[:1], t[:-1]])),
     "tensor 'layer.weight' has indices that are not strictly ascending"),
    ("sparse", "unordered indices", _tensor_edit("layer.weight/indices", lambda t: t.flip(0)),
     "tensor 'layer.weight' has indices that are not strictly ascending"),
    ("sparse", "index past the end", _tensor_edit("layer.weight/indices", lambda t: torch.cat([t[:-1], torch.tensor([120], dtype=t.dtype)])),
     "tensor 'layer.weight' has an index outside [0, 120)"),
    ("sparse", "lengths that disagree", _tensor_edit("layer.weight/values", lambda t: t[:-1]),
     "tensor 'layer.weight' has part 'values' of shape [35] (float32), expected [36] (float32)"),
    ("sparse", "float indices", _tensor_edit("layer.weight/indices", lambda t: t.float()),
     "tensor 'layer.weight' has part 'indices' of shape [36] (float32), expected [36] (int32/int64)"),
    ("sparse", "more indices than entries", _table_edit("head.bias", shape=[2]),
     "tensor 'head.bias' has part 'indices' of shape [3]: not a list of at most 2 entries"),
    ("bitdelta", "short sign bits", _tensor_edit("layer.weight/signs", lambda t: t[:-1]),
     "tensor 'layer.weight' has part 'signs' of shape [14] (uint8), expected [15] (uint8)"),
    ("bitdelta", "a scale that is not a scalar", _tensor_edit("layer.weight/scale", lambda t: t.reshape(1)),
     "tensor 'layer.weight' has part 'scale' of shape [1] (float32), expected [] (float32)"),
    ("lowrank", "3-D factor", _tensor_edit("layer.weight/left", lambda t: t.reshape(12, 2, 1)),
     "tensor 'layer.weight' has part 'left' of shape [12, 2, 1] (float32), expected [12, 2]"),
    ("lowrank", "a rank the factors lack", _table_edit("layer.weight", rank=3),
     "tensor 'layer.weight' has part 'left' of shape [12, 2] (float32), expected [12, 3]"),
    ("lowrank", "a rank above the matrix's", _table_edit("layer.weight", rank=11),
     "tensor 'layer.weight' has rank 11, not a whole number in [1, 10]"),
    ("lowrank", "a scaling that is not finite", _table_edit("layer.weight", scaling="inf"),
     "tensor 'layer.weight' has scaling 'inf', not a finite number"),
    ("lowrank", "float shape", _table_edit("layer.weight", shape=[12.0, 10]),
     "tensor 'layer.weight' has shape [12.0, 10], not a list of whole numbers >= 0"),
    ("lowrank", "negative shape", _table_edit("head.bias", shape=[-10]),
     "tensor 'head.bias' has shape [-10], not a list of whole numbers >= 0"),
    ("sparse", "a 1e9 x 1e9 shape", _table_edit("layer.weight", shape=[10**9, 10**9]),
     "tensor 'layer.weight' has shape [1000000000, 1000000000], 1e+18 entries (more than 1.1e+12)"),
    ("lowrank", "a 1e9 x 1e9 shape", _table_edit("layer.weight", shape=[10**9, 10**9]),
     "tensor 'layer.weight' has shape [1000000000, 1000000000], 1e+18 entries (more than 1.1e+12)"),
    ("bitdelta", "an integer dtype", _table_edit("layer.weight", dtype="I64"),
     "tensor 'layer.weight' has dtype 'I64', not a floating-point safetensors dtype"),
    ("bitdelta", "an encoding of another layout", _table_edit("layer.weight", encoding="sparse"),
     "tensor 'layer.weight' has encoding 'sparse', not one of zero, dense, bitdelta (the bitdelta layout's)"),
    ("lowrank", "an unknown encoding", _table_edit("layer.weight", encoding="zstd"),
     "tensor 'layer.weight' has encoding 'zstd', not one of zero, dense, lowrank"),
    ("lowrank", "a dense part of another dtype", _tensor_edit("head.bias/dense", lambda t: t.double()),
     "tensor 'head.bias' has part 'dense' of shape [10] (float64), expected [10] (float32)"),
    ("sparse", "a stored tensor no entry claims", _tensor_edit("extra/values", lambda _: torch.ones(2)),
     "stored tensor 'extra/values' belongs to no entry of its taskvec.layout_tensors"),
]


def _tamper(stored_files, tmp_path, layout, edit):
    tensors, meta = stored_files[layout]
    tensors, meta = dict(tensors), dict(meta)
    edit(tensors, meta)
    path = tmp_path / f"{layout}-tampered.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("layout, case, edit, problem", TAMPERED, ids=[f"{t[0]}: {t[1]}" for t in TAMPERED])
def test_a_tampered_file_is_one_line_naming_what_is_wrong(stored_files, tmp_path, layout, case, edit, problem):
    path = _tamper(stored_files, tmp_path, layout, edit)
    with pytest.raises(TaskVecError) as err:
        vec = TaskVector.load(path)
        for name in vec.names:  # some checks (a sparse tensor's indices) run when the values are first read
            vec.get_tensor(name)
    message = str(err.value)
    assert message.startswith(f"{path}: corrupt {layout} task vector: ") and problem in message and "\n" not in message

    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code != 0 and problem in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_the_legacy_lora_layout_is_checked_too(tmp_path):
    tensors = load_file(str(FORMAT1 / "lora.safetensors"))
    with safe_open(str(FORMAT1 / "lora.safetensors"), "pt") as fh:
        meta = fh.metadata()
    tensors["layer.weight.lowrank_left"] = tensors["layer.weight.lowrank_left"][:, :2].contiguous()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(TaskVecError, match=r"corrupt lora task vector: tensor 'layer.weight' has factor 'layer.weight.lowrank_left' of shape \[12, 2\]"):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_compressing_an_all_zero_vector_says_nothing_is_stored(tmp_path):
    base = {"w": torch.randn(6, 4, generator=torch.Generator().manual_seed(5))}
    save_file(base, str(tmp_path / "base.safetensors"))
    TaskVector.extract(tmp_path / "base.safetensors", tmp_path / "base.safetensors").save(tmp_path / "zero.safetensors")
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "zero.safetensors"), "--format", "sparse", "--density", "0.5", "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 0, result.output
    assert "size: 0 bytes stored, 96 dense (nothing stored: every tensor is zero)" in result.output.splitlines()
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "c.safetensors")])
    assert "size: 0 bytes stored, 96 dense (nothing stored: every tensor is zero)" in shown.output.splitlines()
