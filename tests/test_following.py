"""Fingerprints taken while a download writes its files (engine/following.py): the files are
grown here piece by piece, as a download writes them, and read between the pieces."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlflow_taskvec.engine import CheckpointWriter, TaskVector, TensorSpec, open_checkpoint
from mlflow_taskvec.engine.compressed import compress
from mlflow_taskvec.engine.following import FollowedFile, Follower
from mlflow_taskvec.mlflow.downloads import _download_fingerprint


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "embed.weight": torch.randn(300, 17, generator=g),
        "layer.0.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(64, generator=g),
        "empty": torch.zeros(0, 4),
        "norm.weight": torch.ones(17, dtype=torch.float16),
    }


@pytest.fixture
def download(tmp_path):
    """A saved checkpoint ``src``, and ``dst`` in a download folder watched by ``follower``."""
    src = tmp_path / "src.safetensors"
    save_file(_state(), str(src))
    (tmp_path / "dl").mkdir()
    return src, tmp_path / "dl" / "model.safetensors", Follower(tmp_path / "dl")


def _grow(src: Path, dst: Path, sizes: list[int], between) -> None:
    """Append ``src``'s bytes to ``dst`` in pieces of ``sizes`` (the rest last), calling ``between()`` after each."""
    data = src.read_bytes()
    at = 0
    with open(dst, "wb") as f:
        for size in [*sizes, len(data)]:
            f.write(data[at : at + size])
            f.flush()
            at = min(at + size, len(data))
            between(at)
            if at == len(data):
                break


def test_a_file_hashed_as_it_grows_has_the_fingerprint_of_the_whole_file(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file(_state(), str(src))
    (tmp_path / "dl").mkdir()
    followed = FollowedFile(tmp_path / "dl" / "model.safetensors")
    seen: list[tuple[int, int]] = []
    header_end = 8 + int.from_bytes(src.read_bytes()[:8], "little")

    # pieces that split the length, the header, and tensors (one of them over two pieces)
    _grow(src, followed.path, [5, 3, header_end - 20, 30, 1000, 777, 9000], lambda at: seen.append((at, followed.poll() and followed.read)))

    assert followed.complete() and not followed.broken
    # nothing is read before the header is whole; from then on every byte as soon as it is written
    assert all(read == 0 for at, read in seen if at < header_end)
    assert all(read == at for at, read in seen if at >= header_end)
    assert followed.read == src.stat().st_size
    follower = Follower(tmp_path / "dl")
    follower.files[followed.path] = followed
    assert follower.fingerprint(followed.path) == open_checkpoint(src).fingerprint(fresh=True)


def test_a_sharded_folder_downloaded_in_a_thread_has_the_folders_fingerprint(tmp_path):
    state = _state()
    written = tmp_path / "written"
    with CheckpointWriter(written, {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in state.items()}, max_shard_size="8KB") as writer:
        for name in writer.order:
            writer.write(name, state[name])
        writer.commit()
    assert len(list(written.glob("*.safetensors"))) > 1
    dl = tmp_path / "dl"
    dl.mkdir()

    with Follower(dl) as follower:  # the thread reads while the files are copied in, one after another
        for src in sorted(written.iterdir()):
            _grow(src, dl / src.name, [100, 2000, 3000], lambda at: None)

    assert all(f.complete() for f in follower.files.values()) and len(follower.files) == len(list(written.glob("*.safetensors")))
    assert follower.bytes_read == sum(p.stat().st_size for p in written.glob("*.safetensors"))  # each byte read once
    assert follower.fingerprint(dl) == open_checkpoint(written).fingerprint(fresh=True)


def test_a_file_rewritten_while_it_was_followed_gives_no_fingerprint(download):
    src, dst, follower = download
    _grow(src, dst, [4000], lambda at: follower.poll())
    with open(dst, "wb") as f:  # a retried download starts the file again
        f.write(src.read_bytes()[:100])
    follower.poll()
    shutil.copyfile(src, dst)
    follower.poll()

    assert follower.files[dst].broken
    assert follower.fingerprint(dst) is None


def test_a_file_changed_after_its_last_read_gives_no_fingerprint(download):
    src, dst, follower = download
    _grow(src, dst, [], lambda at: follower.poll())
    assert follower.fingerprint(dst) == open_checkpoint(src).fingerprint(fresh=True)

    with open(dst, "r+b") as f:  # the same size, other bytes, written after the last read
        f.seek(src.stat().st_size - 4)
        f.write(b"\x7f\x7f\x7f\x7f")

    assert follower.fingerprint(dst) is None


def test_bytes_seen_out_of_order_never_pass_for_the_recorded_fingerprint(download):
    """A writer that writes a file's end first shows zeros where the start will be: what was read
    is not the file, and the download is hashed again, so it is accepted for what it is."""
    src, dst, follower = download
    data = src.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little") + 50  # the header and a little more
    with open(dst, "wb") as f:
        f.write(data[:start])
        f.seek(len(data) - 100)
        f.write(data[-100:])
    follower.poll()  # reads a hole of zeros
    with open(dst, "r+b") as f:
        f.seek(start)
        f.write(data[start:-100])
    follower.poll()
    true = open_checkpoint(src).fingerprint(fresh=True)

    stitched = follower.fingerprint(dst)
    assert stitched is not None and stitched != true
    assert _download_fingerprint(dst, follower, expected=true) == true  # hashed again, and right


def test_a_stored_layout_is_not_fingerprinted_from_its_stored_bytes(tmp_path):
    state = {n: t for n, t in _state().items() if t.numel()}
    save_file(state, str(tmp_path / "base.safetensors"))
    save_file({n: t * 1.5 for n, t in state.items()}, str(tmp_path / "ft.safetensors"))
    src = tmp_path / "sparse.safetensors"
    compress(TaskVector.extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors"), src, "sparse", density=0.5)
    (tmp_path / "dl").mkdir()
    follower = Follower(tmp_path / "dl")
    dst = tmp_path / "dl" / "sparse.safetensors"
    _grow(src, dst, [], lambda at: follower.poll())

    assert follower.files[dst].complete()
    assert follower.fingerprint(dst) is None  # its fingerprint is the dense vector's: hashed after
    assert _download_fingerprint(dst, follower, expected=open_checkpoint(src).fingerprint(fresh=True)) == open_checkpoint(src).fingerprint(fresh=True)


@pytest.mark.parametrize("header", [b"\xff" * 8, (50).to_bytes(8, "little") + b"not json" + b" " * 42])
def test_a_file_that_is_not_safetensors_is_left_to_the_pass_after(tmp_path, header):
    (tmp_path / "dl").mkdir()
    followed = FollowedFile(tmp_path / "dl" / "x.safetensors")
    followed.path.write_bytes(header)

    assert followed.poll() == 0
    assert followed.broken and not followed.complete()
