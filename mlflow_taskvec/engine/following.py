"""Fingerprints taken while a download writes the files, not in a pass after it.

A ``Follower`` watches a folder that another writer (MLflow's download) fills with
safetensors files. Each file is read as it grows, from the page cache its writer has
just filled: its header first, then every tensor's bytes into that tensor's BLAKE3,
in file order. When the download has returned, leaving the ``with`` block reads what is
left, and ``fingerprint`` gives the checkpoint's, the same value ``Checkpoint.fingerprint``
computes (``combine_digests`` over name, dtype, shape and each tensor's BLAKE3).

What it gives is only a candidate: a writer that rewrote a file it had started, or
wrote one out of order, may have shown bytes that are not the file's last. The caller
accepts it only when it equals the fingerprint the registry recorded, which no wrong
stitching of bytes can reach, and hashes the files again otherwise.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from mlflow_taskvec.engine.checkpoint import SafetensorsCheckpoint, combine_digests, files_key, new_digest, open_checkpoint, remember_fingerprint
from mlflow_taskvec.engine.io import MAX_HEADER_BYTES, parse_header_bytes
from mlflow_taskvec.errors import TaskVecError

BLOCK_BYTES = 8 * 1024 * 1024  # read (and hash) at most this much of a file at a time
POLL_SECONDS = 0.01


class FollowedFile:
    """One safetensors file hashed tensor by tensor as it grows. Not thread-safe: one reader."""

    def __init__(self, path: Path):
        self.path = path
        self.read = 0  # bytes of the file consumed so far
        self.broken = False  # the file shrank or was replaced: what was read may not be its content
        self.last_seen: tuple | None = None  # (device, inode, size, mtime) at the last poll
        self._spans: list[tuple[int, int, str]] | None = None  # (start, end, name) of each tensor, in file order
        self._specs: dict = {}
        self._next = 0  # index of the first span not yet hashed whole
        self._hasher = None
        self.digests: dict[str, str] = {}

    def poll(self) -> int:
        """Read and hash whatever the writer has added since the last poll; the bytes read."""
        if self.broken:
            return 0
        try:
            st = os.stat(self.path)
        except OSError:
            return 0
        seen, self.last_seen = self.last_seen, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if seen is not None and (seen[:2] != self.last_seen[:2] or st.st_size < self.read):  # replaced, or shrunk
            self.broken = True
            return 0
        before = self.read
        try:
            with open(self.path, "rb") as f:
                if self._spans is None and not self._read_header(f, st.st_size):
                    return 0
                while self.read < st.st_size and not self.broken:
                    f.seek(self.read)
                    block = f.read(min(BLOCK_BYTES, st.st_size - self.read))
                    if not block:
                        break
                    self._feed(memoryview(block))
        except OSError:
            self.broken = True  # moved or unreadable: the pass after the download reads it
        return self.read - before

    def _read_header(self, f, size: int) -> bool:
        if size < 8:
            return False
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            self.broken = True
            return False
        if size < 8 + header_len:
            return False
        try:
            entries, _metadata = parse_header_bytes(self.path, f.read(header_len), 8 + header_len)
        except TaskVecError:
            self.broken = True  # not a safetensors file (yet): the pass after the download says why
            return False
        self._specs = {name: e.spec for name, e in entries.items()}
        self._spans = sorted((e.start, e.end, name) for name, e in entries.items())
        for start, end, name in self._spans:
            if end == start:
                self.digests[name] = new_digest().hexdigest()
        self.read = 8 + header_len
        return True

    def _feed(self, block: memoryview) -> None:
        offset = self.read
        while block:
            while self._next < len(self._spans) and self._spans[self._next][1] <= offset:
                self._next += 1
            if self._next == len(self._spans):
                break  # trailing bytes belong to no tensor
            start, end, name = self._spans[self._next]
            if offset < start:  # padding between tensors
                skip = min(start - offset, len(block))
                block, offset = block[skip:], offset + skip
                continue
            take = min(end - offset, len(block))
            if self._hasher is None:
                self._hasher = new_digest()
            self._hasher.update(block[:take])
            block, offset = block[take:], offset + take
            if offset == end:
                self.digests[name] = self._hasher.hexdigest()
                self._hasher = None
        self.read = offset + len(block)

    def spec(self, name: str):
        return self._specs[name]

    def complete(self) -> bool:
        """Every tensor hashed whole, and nothing of the file left unread at the last poll."""
        return (
            not self.broken and self._spans is not None and len(self.digests) == len(self._specs)
            and self.last_seen is not None and self.read == self.last_seen[2]
        )


class Follower:
    """Hash the safetensors files that appear under ``folder`` while ``with`` runs (in a thread)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files: dict[Path, FollowedFile] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskvec-follow", daemon=True)
        self.bytes_read = 0

    def __enter__(self) -> "Follower":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.poll()  # the writer is done: read what is left

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        for path in sorted(self.folder.rglob("*.safetensors")):
            if path.is_file():
                followed = self.files.setdefault(path, FollowedFile(path))
                self.bytes_read += followed.poll()

    def fingerprint(self, weights: Path) -> str | None:
        """The fingerprint of the plain safetensors checkpoint at ``weights`` (a file or a
        folder) from what was read while it was written, or None when the files were not
        all read whole, or changed since, or are of a stored layout, whose fingerprint is the
        dense vector's). ``remember`` it once it is accepted."""
        try:
            ckpt = open_checkpoint(weights)
        except TaskVecError:
            return None
        if type(ckpt) is not SafetensorsCheckpoint:
            return None
        followed = [self.files.get(p) for p in ckpt.files]
        if not all(f is not None and f.complete() for f in followed):
            return None
        if files_key(ckpt.files) != tuple(sorted(f.last_seen for f in followed)):
            return None  # written to after the last read
        entries = [(name, f.spec(name), digest) for f in followed for name, digest in f.digests.items()]
        return combine_digests(entries)

    @staticmethod
    def remember(weights: Path, fingerprint: str) -> None:
        """Record an accepted fingerprint for the files at ``weights``: opening them again,
        under the name the cache gives them, does not hash them a second time."""
        remember_fingerprint(open_checkpoint(weights).files, fingerprint)
