"""Checkpoint I/O: lazy reading, atomic (sharded) writing, the content fingerprint,
and refusal of corrupt or pickle inputs."""

from __future__ import annotations

import re

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlflow_taskvec.engine import CheckpointWriter, TaskVector, TensorSpec, merge_to, open_checkpoint
from mlflow_taskvec.engine.writer import parse_size
from mlflow_taskvec.errors import TaskVecError


def specs_of(sd):
    return {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in sd.items()}


def write_all(writer, sd):
    for name in writer.order:
        writer.write(name, sd[name])


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def assert_no_output_here(directory):
    """Nothing at all was left in ``directory`` (no output, no temporary leftovers)."""
    assert list(directory.iterdir()) == []


def load_dir(directory):
    """All tensors of a single-file or sharded output directory, via safetensors itself."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(6, 5, generator=g),
        "b.weight": torch.randn(40, 10, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(7, generator=g, dtype=torch.float64),
        "d.half": torch.randn(3, 3, generator=g).half(),
        "ids": torch.arange(10, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
    }


# -- reading ---------------------------------------------------------------------------


def test_single_file_opens_with_names_specs_and_values(tmp_path, state):
    save_file(state, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.keys() == sorted(state)
    assert ckpt.spec("b.weight") == TensorSpec(torch.bfloat16, (40, 10))
    assert ckpt.num_parameters() == sum(t.numel() for t in state.values())
    assert_same_state({n: ckpt.get_tensor(n) for n in ckpt.keys()}, state)


def test_single_file_tensors_are_zero_copy_views_of_one_mapping(tmp_path, state):
    save_file(state, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    first, second = ckpt.get_tensor("a.weight"), ckpt.get_tensor("a.weight")
    assert first.data_ptr() == second.data_ptr()
    # Views of one mapping: their addresses differ exactly by their offsets in the file.
    data = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    a, c = ckpt.get_tensor("a.weight"), ckpt.get_tensor("c.bias")
    offset_gap = header["c.bias"]["data_offsets"][0] - header["a.weight"]["data_offsets"][0]
    assert c.data_ptr() - a.data_ptr() == offset_gap


def test_hf_directory_with_model_safetensors_opens(tmp_path, state, hf_dir):
    directory = hf_dir(tmp_path / "model", state)
    ckpt = open_checkpoint(directory)
    assert ckpt.directory == directory
    assert_same_state({n: ckpt.get_tensor(n) for n in ckpt.keys()}, state)


def test_hf_directory_with_sharded_index_opens_every_shard(tmp_path, state, hf_dir):
    directory = hf_dir(tmp_path / "model", state, num_shards=3)
    ckpt = open_checkpoint(directory)
    assert len(ckpt.files) == 3
    assert_same_state({n: ckpt.get_tensor(n) for n in ckpt.keys()}, state)


def test_directory_holding_one_differently_named_safetensors_file_opens(tmp_path, state):
    (tmp_path / "model").mkdir()
    save_file(state, str(tmp_path / "model" / "weights.safetensors"))
    assert open_checkpoint(tmp_path / "model").keys() == sorted(state)


def test_state_dict_opens_as_checkpoint_with_the_same_interface(state):
    ckpt = open_checkpoint(state)
    assert ckpt.keys() == sorted(state)
    assert ckpt.spec("ids") == TensorSpec(torch.int64, (10,))
    assert_same_state({n: ckpt.get_tensor(n) for n in ckpt.keys()}, state)


def test_open_checkpoint_returns_a_checkpoint_as_is(state):
    ckpt = open_checkpoint(state)
    assert open_checkpoint(ckpt) is ckpt


def test_missing_path_is_refused_naming_it(tmp_path):
    with pytest.raises(TaskVecError, match="nowhere.safetensors: no such file or directory"):
        open_checkpoint(tmp_path / "nowhere.safetensors")


def test_directory_with_several_safetensors_and_no_index_is_refused(tmp_path, state):
    (tmp_path / "model").mkdir()
    save_file(state, str(tmp_path / "model" / "x.safetensors"))
    save_file(state, str(tmp_path / "model" / "y.safetensors"))
    with pytest.raises(TaskVecError, match="several .safetensors files and no model.safetensors.index.json"):
        open_checkpoint(tmp_path / "model")


def test_index_listing_a_missing_shard_is_refused_naming_the_shard(tmp_path, state, hf_dir):
    directory = hf_dir(tmp_path / "model", state, num_shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TaskVecError, match="lists shard model-00002-of-00002.safetensors which is missing"):
        open_checkpoint(directory)


def test_index_placing_a_tensor_in_the_wrong_shard_is_refused_naming_the_tensor(tmp_path, state, hf_dir):
    directory = hf_dir(tmp_path / "model", state, num_shards=2)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wrong = "model-00002-of-00002.safetensors" if index["weight_map"]["a.weight"].startswith("model-00001") else "model-00001-of-00002.safetensors"
    index["weight_map"]["a.weight"] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(TaskVecError, match="tensor 'a.weight' is listed in"):
        open_checkpoint(directory)


class _Tripwire:
    """Unpickling this creates a directory: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_only_directory_is_refused_and_never_unpickled(tmp_path, hf_dir):
    directory = tmp_path / "model"
    directory.mkdir()
    marker = tmp_path / "unpickled"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Tripwire(marker)}))
    (directory / "config.json").write_text("{}")
    with pytest.raises(TaskVecError, match=r"holds only pickle weights \(pytorch_model.bin\).*never loaded"):
        open_checkpoint(directory)
    assert not marker.exists()


def test_pickle_file_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_Tripwire(marker)))
    with pytest.raises(TaskVecError, match="model.pt: pickle checkpoints are never loaded"):
        open_checkpoint(path)
    assert not marker.exists()


def test_merge_from_pickle_only_directory_is_refused_and_leaves_no_output(tmp_path, fp32_models, out_dir, assert_no_output):
    directory = tmp_path / "pickled"
    directory.mkdir()
    marker = tmp_path / "unpickled"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0])
    with pytest.raises(TaskVecError, match="pytorch_model.bin"):
        merge_to(directory, [vector], [1.0], output=out_dir / "merged")
    assert_no_output(out_dir / "merged")
    assert not marker.exists()


# -- corrupt files ---------------------------------------------------------------------


def _good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)}, str(path))
    return path


def _truncated_in_half(tmp_path, raw_safetensors):
    data = _good_file(tmp_path).read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def _cut_inside_header(tmp_path, raw_safetensors):
    data = _good_file(tmp_path).read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data[:20])
    return path


def _shorter_than_the_length_field(tmp_path, raw_safetensors):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    return path


def _header_length_beyond_file(tmp_path, raw_safetensors):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    return raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 8, header_len=10_000)


def _header_length_absurd(tmp_path, raw_safetensors):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    return raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 8, header_len=2**62)


def _offsets_beyond_file(tmp_path, raw_safetensors):
    header = {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    return raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 16)


def _offsets_not_matching_dtype_and_shape(tmp_path, raw_safetensors):
    header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}
    return raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 64)


def _non_json_header(tmp_path, raw_safetensors):
    return raw_safetensors(tmp_path / "bad.safetensors", b"{this is not json", b"\0" * 8)


def _header_not_an_object(tmp_path, raw_safetensors):
    return raw_safetensors(tmp_path / "bad.safetensors", [1, 2, 3], b"")


def _entry_without_offsets(tmp_path, raw_safetensors):
    return raw_safetensors(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)


def _overlapping_tensors(tmp_path, raw_safetensors):
    header = {
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    return raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 24)


def _unsupported_dtype(tmp_path, raw_safetensors):
    header = {"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}
    return raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 16)


CORRUPT = [
    pytest.param(_truncated_in_half, "truncated safetensors file", id="truncated-in-half"),
    pytest.param(_cut_inside_header, "truncated safetensors file", id="cut-inside-header"),
    pytest.param(_shorter_than_the_length_field, "truncated safetensors file", id="shorter-than-8-bytes"),
    pytest.param(_header_length_beyond_file, "header claims 10000 bytes", id="header-length-beyond-file"),
    pytest.param(_header_length_absurd, "corrupt safetensors header", id="header-length-absurd"),
    pytest.param(_offsets_beyond_file, "tensor 'w' ends at byte 4000", id="data-offsets-beyond-file"),
    pytest.param(_offsets_not_matching_dtype_and_shape, r"tensor 'w' of shape \[4, 4\] F32 needs 64 bytes, offsets span 32", id="offsets-not-matching-dtype-shape"),
    pytest.param(_non_json_header, "not valid JSON", id="non-json-header"),
    pytest.param(_header_not_an_object, "not a JSON object", id="header-not-an-object"),
    pytest.param(_entry_without_offsets, "entry 'w' lacks dtype, shape or data_offsets", id="entry-without-offsets"),
    pytest.param(_overlapping_tensors, "tensors 'w' and 'v' overlap|tensors 'v' and 'w' overlap", id="overlapping-tensors"),
    pytest.param(_unsupported_dtype, "tensor 'w' has unsupported dtype 'C64'", id="unsupported-dtype"),
]


@pytest.mark.parametrize("make_corrupt, message", CORRUPT)
def test_corrupt_file_is_refused_naming_the_file_and_the_fault(tmp_path, raw_safetensors, make_corrupt, message):
    path = make_corrupt(tmp_path, raw_safetensors)
    with pytest.raises(TaskVecError, match=message) as info:
        open_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("make_corrupt, message", CORRUPT[:8])
def test_merge_onto_a_corrupt_base_is_refused_and_leaves_no_output(
    tmp_path, raw_safetensors, fp32_models, out_dir, assert_no_output, make_corrupt, message
):
    path = make_corrupt(tmp_path, raw_safetensors)
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0])
    for output in (out_dir / "merged.safetensors", out_dir / "merged"):
        with pytest.raises(TaskVecError, match=message):
            merge_to(path, [vector], [1.0], output=output, max_shard_size=None if output.suffix else "1KB")
        assert_no_output(output)


def test_extract_from_a_truncated_finetune_is_refused_naming_it(tmp_path, raw_safetensors, fp32_models):
    path = _truncated_in_half(tmp_path, raw_safetensors)
    with pytest.raises(TaskVecError, match=f"{path}: truncated safetensors file"):
        TaskVector.extract(fp32_models.base, path)


# -- writing ---------------------------------------------------------------------------


def test_writer_single_file_loads_with_safetensors_with_identical_values_and_metadata(out_dir, state):
    path = out_dir / "out.safetensors"
    with CheckpointWriter(path, specs_of(state), metadata={"note": "hello"}) as writer:
        write_all(writer, state)
        writer.commit()
    assert_same_state(load_file(str(path)), state)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hello"}


def test_writer_accepts_each_tensor_in_consecutive_chunks(out_dir, state):
    path = out_dir / "out.safetensors"
    with CheckpointWriter(path, specs_of(state)) as writer:
        for name in writer.order:
            flat = state[name].reshape(-1)
            for start in range(0, flat.numel(), 3):
                writer.write(name, flat[start : start + 3])
        writer.commit()
    assert_same_state(load_file(str(path)), state)


def test_writer_without_shard_size_writes_model_safetensors_into_a_directory(out_dir, state):
    with CheckpointWriter(out_dir / "model", specs_of(state)) as writer:
        write_all(writer, state)
        writer.commit()
    assert sorted(p.name for p in (out_dir / "model").iterdir()) == ["model.safetensors"]
    assert_same_state(load_file(str(out_dir / "model" / "model.safetensors")), state)


def test_writer_shards_within_max_size_and_writes_an_index(out_dir, state):
    directory = out_dir / "model"
    with CheckpointWriter(directory, specs_of(state), max_shard_size=1000) as writer:
        write_all(writer, state)
        writer.commit()
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        tensors = load_file(str(directory / shard))
        assert sorted(tensors) == sorted(n for n, s in index["weight_map"].items() if s == shard)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= 1000 or len(tensors) == 1
    assert_same_state(load_dir(directory), state)
    assert_same_state({n: open_checkpoint(directory).get_tensor(n) for n in state}, state)


def test_writer_commit_returns_the_fingerprint_of_what_it_wrote(out_dir, state):
    with CheckpointWriter(out_dir / "model", specs_of(state), max_shard_size="1KB") as writer:
        write_all(writer, state)
        fingerprint = writer.commit()
    assert fingerprint == open_checkpoint(out_dir / "model").fingerprint() == open_checkpoint(state).fingerprint()


@pytest.mark.parametrize("size, expected", [(1234, 1234), ("500", 500), ("2KB", 2000), ("2 KiB", 2048), ("1.5MB", 1_500_000), ("1GiB", 2**30)])
def test_shard_sizes_are_parsed_from_bytes_and_units(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["lots", "5XB", 0, -1, "0KB", True])
def test_shard_size_that_is_not_a_positive_size_is_refused(out_dir, state, size):
    with pytest.raises(TaskVecError, match="max_shard_size"):
        CheckpointWriter(out_dir / "model", specs_of(state), max_shard_size=size)
    assert_no_output_here(out_dir)



def test_writer_refuses_sharding_into_a_single_file_path(out_dir, state):
    with pytest.raises(TaskVecError, match="a sharded output must be a directory"):
        CheckpointWriter(out_dir / "out.safetensors", specs_of(state), max_shard_size="1KB")
    assert_no_output_here(out_dir)


def test_writer_discards_everything_when_the_block_raises(out_dir, state):
    for output, shard in ((out_dir / "out.safetensors", None), (out_dir / "model", "1KB")):
        with pytest.raises(KeyError):
            with CheckpointWriter(output, specs_of(state), max_shard_size=shard) as writer:
                writer.write(writer.order[0], state[writer.order[0]])
                raise KeyError("boom")
        assert_no_output_here(out_dir)


def test_writer_left_without_commit_raises_and_leaves_nothing(out_dir, state):
    with pytest.raises(RuntimeError, match="without commit"):
        with CheckpointWriter(out_dir / "model", specs_of(state)) as writer:
            write_all(writer, state)
    assert_no_output_here(out_dir)


def test_writer_refuses_a_commit_before_every_tensor_is_written(out_dir, state):
    with pytest.raises(RuntimeError, match="closed before tensor"):
        with CheckpointWriter(out_dir / "out.safetensors", specs_of(state)) as writer:
            writer.write(writer.order[0], state[writer.order[0]])
            writer.commit()
    assert_no_output_here(out_dir)


def test_writer_refuses_an_existing_output_and_leaves_it_untouched(out_dir, state):
    path = out_dir / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(TaskVecError, match="out.safetensors: output already exists"):
        CheckpointWriter(path, specs_of(state))
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.safetensors"]


def test_writer_with_overwrite_replaces_an_existing_output(out_dir, state):
    directory = out_dir / "model"
    directory.mkdir()
    (directory / "stale.txt").write_text("old")
    with CheckpointWriter(directory, specs_of(state), overwrite=True) as writer:
        write_all(writer, state)
        writer.commit()
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["model"]


def test_writer_creates_missing_parent_directories(tmp_path, state):
    path = tmp_path / "new" / "deeper" / "out.safetensors"
    with CheckpointWriter(path, specs_of(state)) as writer:
        write_all(writer, state)
        writer.commit()
    assert_same_state(load_file(str(path)), state)


def test_writer_writes_zero_element_tensors(out_dir):
    sd = {"empty": torch.zeros(0, 4), "w": torch.ones(3)}
    path = out_dir / "out.safetensors"
    with CheckpointWriter(path, specs_of(sd)) as writer:
        write_all(writer, sd)
        writer.commit()
    assert_same_state(load_file(str(path)), sd)


# -- merge outputs next to an HF base --------------------------------------------------


def test_merge_from_hf_base_carries_its_non_weight_files(tmp_path, fp32_models, out_dir, hf_dir):
    base_dir = hf_dir(tmp_path / "base", fp32_models.base_sd, num_shards=2)
    (base_dir / "pytorch_model.bin").write_bytes(b"not to be copied")
    vector = TaskVector.extract(base_dir, fp32_models.finetunes[0])
    merge_to(base_dir, [vector], [1.0], output=out_dir / "merged")
    names = sorted(p.name for p in (out_dir / "merged").iterdir())
    assert names == sorted(
        ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    )
    for fname in ("config.json", "tokenizer.json"):
        assert (out_dir / "merged" / fname).read_text() == (base_dir / fname).read_text()


def test_merge_sharded_output_from_hf_base_has_its_own_index_and_the_base_files(tmp_path, fp32_models, out_dir, hf_dir):
    base_dir = hf_dir(tmp_path / "base", fp32_models.base_sd)
    vector = TaskVector.extract(base_dir, fp32_models.finetunes[0])
    result = merge_to(base_dir, [vector], [1.0], output=out_dir / "merged", max_shard_size="300B")
    directory = out_dir / "merged"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(fp32_models.base_sd)
    assert (directory / "config.json").is_file() and (directory / "tokenizer_config.json").is_file()
    assert_same_state(load_dir(directory), fp32_models.finetune_sds[0])
    assert result.fingerprint == open_checkpoint(directory).fingerprint()


def test_merge_into_a_single_file_copies_nothing_beside_it(tmp_path, fp32_models, out_dir, hf_dir):
    base_dir = hf_dir(tmp_path / "base", fp32_models.base_sd)
    vector = TaskVector.extract(base_dir, fp32_models.finetunes[0])
    merge_to(base_dir, [vector], [1.0], output=out_dir / "merged.safetensors")
    assert sorted(p.name for p in out_dir.iterdir()) == ["merged.safetensors"]


# -- fingerprint -----------------------------------------------------------------------


def test_fingerprint_is_the_same_for_a_file_its_sharded_copy_and_its_state_dict(tmp_path, state, hf_dir):
    save_file(state, str(tmp_path / "m.safetensors"))
    sharded = hf_dir(tmp_path / "sharded", state, num_shards=3)
    single = open_checkpoint(tmp_path / "m.safetensors").fingerprint()
    assert single == open_checkpoint(sharded).fingerprint()
    assert single == open_checkpoint(state).fingerprint()
    assert re.fullmatch("[0-9a-f]{64}", single), single  # lowercase hex BLAKE3 (tests/test_specifications.py pins its definition)


def test_fingerprint_changes_when_one_byte_of_a_tensor_changes(tmp_path, state):
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    before = open_checkpoint(path).fingerprint()
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 5] ^= 0x01  # one bit of the first tensor's bytes
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    assert open_checkpoint(flipped).fingerprint() != before


def test_fingerprint_ignores_metadata_and_header_layout(tmp_path, out_dir, state):
    save_file(state, str(tmp_path / "plain.safetensors"))
    save_file(state, str(tmp_path / "meta.safetensors"), metadata={"author": "someone", "step": "100"})
    with CheckpointWriter(out_dir / "ours.safetensors", specs_of(state), metadata={"other": "x"}) as writer:
        write_all(writer, state)
        writer.commit()
    assert (tmp_path / "plain.safetensors").read_bytes() != (out_dir / "ours.safetensors").read_bytes()
    fingerprints = {open_checkpoint(p).fingerprint() for p in (tmp_path / "plain.safetensors", tmp_path / "meta.safetensors", out_dir / "ours.safetensors")}
    assert len(fingerprints) == 1


def test_fingerprint_distinguishes_same_bytes_under_another_shape_dtype_or_name():
    t = torch.arange(12, dtype=torch.float32)
    fingerprints = {
        open_checkpoint({"w": t}).fingerprint(),
        open_checkpoint({"w": t.reshape(3, 4)}).fingerprint(),
        open_checkpoint({"w": t.view(torch.int32)}).fingerprint(),
        open_checkpoint({"v": t}).fingerprint(),
    }
    assert len(fingerprints) == 4
