"""Claiming an output path for one writer, from the first check to the final move.

Nothing a user already has may be lost by writing an output:

- an output that is, contains or lies inside one of its inputs is refused (paths are
  compared after resolving symlinks, and files also by inode), ``overwrite`` or not;
- an advisory lock (``fcntl.flock`` on ``.NAME.lock`` beside the output) is held for
  the whole write, so a second writer of the same path fails at once;
- the final move is atomic and checked: it refuses anything that appeared at the path
  since the start, and with ``overwrite`` it replaces only what stood there at the start;
- temporaries are named ``.NAME.partial-<pid>-<random>``. Only the lock holder writes
  them, so any found by the next holder were left by a writer that was killed
  (SIGKILL, power loss) and are removed;
- only a regular file, a folder or a symlink is ever replaced: a device, a FIFO or a
  socket at the path is refused, ``overwrite`` or not.

Every file a command writes goes through this claim: the main outputs (checkpoints,
task vectors, adapters) and the side outputs (heatmaps, lineage pictures and texts,
winning recipes) alike. ``write_file`` is the side outputs' path through it: a side
output is one file, whose folder must exist (none is created), that never replaces
a folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from mlflow_taskvec.errors import OutputExistsError, TaskVecError
from mlflow_taskvec.signals import moved_into_place, one_step, stage

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; the atomic final move still guards the output
    fcntl = None

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2():
    # glibc's soname first: find_library runs ldconfig in a subprocess (milliseconds at every start-up)
    for soname in ("libc.so.6", None):
        try:
            libc = ctypes.CDLL(soname or ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2
        except (OSError, AttributeError):  # not glibc >= 2.28: the portable fallbacks below
            continue
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return fn
    return None


_RENAMEAT2 = _load_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when this system or file system lacks it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_no_replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if anything is at ``dst``, never replacing it."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if src.is_dir() and not src.is_symlink():
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)  # a directory is only ever replaced by rename when it is empty
    else:
        try:
            os.link(src, dst, follow_symlinks=False)  # EEXIST, atomically, when dst exists
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then move (a small window)
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
            os.rename(src, dst)
            return
        os.unlink(src)


def exchange(a: Path, b: Path) -> None:
    """Swap ``a`` and ``b`` atomically (both must exist)."""
    if _renameat2(a, b, _RENAME_EXCHANGE):
        return
    # No atomic swap here: a three-step dance, each step a rename.
    aside = b.parent / f".{b.name}.aside-{uuid.uuid4().hex[:8]}"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one file (or folder) at a path from another put there later: inodes are
    reused once freed, so the modification time too (a rename leaves it as it is)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole folder; quietly, as cleanup must not fail."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def refuse_aliasing(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is, contains or lies inside an input (through symlinks and hard links too)."""
    output = Path(output)
    replaced = Path(os.path.realpath(output.parent)) / output.name  # the entry a move would replace
    targets = {replaced, Path(os.path.realpath(output))}  # and what it points to, if a link
    out_id = None
    with contextlib.suppress(OSError):
        st = os.stat(output)
        out_id = (st.st_dev, st.st_ino)
    for given in inputs:
        given = Path(given)
        real = Path(os.path.realpath(given))
        same_file = False
        with contextlib.suppress(OSError):
            st = os.stat(given)
            same_file = out_id == (st.st_dev, st.st_ino)
        for target in targets:
            if target == real or same_file:
                why = "is the input"
            elif target in real.parents:
                why = "contains the input"
            elif real in target.parents:
                why = "lies inside the input"
            else:
                continue
            raise TaskVecError(f"{output}: the output {why} {given}; writing it would destroy what it is computed from (choose another output path)")


def check_output_path(
    output: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    what: str | None = None,
) -> Path:
    """Refuse, before any work, an output that exists (unless ``overwrite``), that another
    writer holds, that is an input, or (for a side output: ``what`` names it, e.g. "heatmap")
    whose folder is missing or that is a folder: what a writer would refuse at its start,
    checked ahead (e.g. before a run)."""
    claim = OutputClaim(output, overwrite, inputs=inputs, what=what)
    claim.release()
    return claim.path


def write_file(
    output: str | os.PathLike,
    write: Callable[[Path], None],
    what: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write the side output ``what`` (a "heatmap", a "lineage picture") at ``output``, whole or
    not at all: ``write(tmp)`` writes the file under a temporary name beside it, then the
    claim's checked final move puts it in place. Nothing is left behind on failure."""
    with OutputClaim(output, overwrite, inputs=inputs, what=what) as claim:
        try:
            return claim.write(write)
        except OSError as exc:
            raise TaskVecError(f"{claim.path}: cannot write the {what} ({exc.strerror or exc})") from None


def write_text(output: str | os.PathLike, text: str, what: str, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``write_file`` for a text (UTF-8)."""
    return write_file(output, lambda tmp: tmp.write_text(text, "utf-8"), what, overwrite=overwrite, inputs=inputs)


_HELD: list["OutputClaim"] = []  # the claims this process holds now, outermost first


_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def _refuse_special(path: Path) -> None:
    """Refuse a path that holds something other than a regular file, a folder or a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    kind = _KINDS.get(stat.S_IFMT(mode))
    if kind is not None:
        raise TaskVecError(f"{path}: is {kind}, not a regular file or folder; it is left as it is (choose another output path)")


class OutputClaim:
    """One writer's hold on an output path: the lock, and what stood there at the start.

    Create it before any work; ``partial()`` names a temporary beside the output,
    ``move_into_place(tmp)`` finishes, ``release()`` lets go (both idempotent).
    """

    def __init__(
        self,
        output: str | os.PathLike,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike] = (),
        what: str | None = None,
    ):
        """``inputs``: what the output is computed from (refused as the output, see
        ``refuse_aliasing``). ``what``: for a side output, what it is ("heatmap"): its folder
        must exist, and it never replaces a folder. Without it (a main output), a missing
        folder is created."""
        self.path = Path(output)
        self.overwrite = overwrite
        self._lock_path = self.path.parent / f".{self.path.name}.lock"
        self._lock_fd: int | None = None
        self._marks_stages = False  # the command's own output (no claim held around it) marks its stages
        self._moved = False
        _refuse_special(self.path)
        refuse_aliasing(self.path, inputs)
        if what is not None:
            if self.path.is_dir():
                raise TaskVecError(f"{self.path}: is a folder; the {what} is a file (give a file path)")
            if not self.path.parent.is_dir():
                raise TaskVecError(f"{self.path}: cannot write the {what}, there is no folder {self.path.parent}")
        if os.path.lexists(self.path) and not overwrite:
            raise OutputExistsError(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.start = _identity(self.path)
            if self.start is not None and not overwrite:  # appeared between the check and the lock
                raise OutputExistsError(self.path)
            _refuse_special(self.path)
            self._remove_stale_partials()
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> "OutputClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the lock ----------------------------------------------------------------------------
    def _lock(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip()
                os.close(fd)
                who = f" (process {holder})" if holder.isdigit() else ""
                raise TaskVecError(
                    f"{self.path}: another writer is writing this output{who}; wait for it to finish or choose another output path"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us removes the lock file as it lets go: the file we
            # locked must still be the one at the path, else try again.
            if os.fstat(fd).st_ino == getattr(_stat_or_none(self._lock_path), "st_ino", None):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode("ascii"))
                self._lock_fd = fd
                self._marks_stages = not _HELD  # a write inside another's (an adapter's weights in its folder) marks none
                _HELD.append(self)
                return
            os.close(fd)

    def release(self) -> None:
        """Let go of the lock; after the final move, the command's output enters its ``done`` stage."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        with contextlib.suppress(ValueError):
            _HELD.remove(self)
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path)  # while still locked, so no one holds a removed file
        with contextlib.suppress(OSError):
            os.close(fd)
        if self._moved:
            self.stage("done")

    def stage(self, name: str) -> None:
        """Mark the command's stage ``name`` (signals.stage), if this claim is the command's own output."""
        if self._marks_stages:
            stage(name)

    # -- temporaries ---------------------------------------------------------------------------
    def partial(self) -> Path:
        """A fresh temporary name beside the output, recognisable as this output's."""
        return self.path.parent / f".{self.path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _remove_stale_partials(self) -> None:
        # We hold the lock and every writer of this output takes it first: whatever
        # temporaries of it exist now belong to writers that died without cleaning up.
        # (Also the names earlier versions used: .partial-<hex>, .old-<hex>; and temporary
        # folders made beside the output by tempfile: .partial-<pid>-<8 of [a-z0-9_]>.)
        ours = re.compile(rf"\.{re.escape(self.path.name)}\.(partial-(\d+-)?|old-|aside-)[0-9a-z_]{{8}}")
        with contextlib.suppress(OSError):
            for leftover in self.path.parent.iterdir():
                if ours.fullmatch(leftover.name):
                    remove_path(leftover)

    # -- finishing ------------------------------------------------------------------------------
    def write(self, write: Callable[[Path], None]) -> Path:
        """The output whole or not at all: ``write(tmp)`` makes it (a file, or a folder) under a
        fresh temporary name beside the output, then the checked final move puts it in place.
        Nothing is left behind on any failure."""
        tmp = self.partial()
        try:
            write(tmp)
            self.stage("writing")  # the partial exists (here whole, not yet in place)
            self.move_into_place(tmp)
        except BaseException:
            remove_path(tmp)
            raise
        return self.path

    def move_into_place(self, tmp: Path) -> None:
        """Put ``tmp`` at the output path, atomically; refuse what appeared there since the start.
        A signal waits until the move and its record are done (``signals.one_step``): then the
        output stands and the message says so."""
        self.stage("final-move")
        with one_step():
            self._move(tmp)
            self._moved = True

    def _move(self, tmp: Path) -> None:
        current = _identity(self.path)
        if current is None:
            try:
                rename_no_replace(tmp, self.path)
                moved_into_place(self.path)
                return
            except FileExistsError:
                current = _identity(self.path)
        if self.start is None or current != self.start:
            raise TaskVecError(
                f"{self.path}: something was put at the output path while writing; it is left as it is and nothing was written"
            )
        exchange(tmp, self.path)
        if _identity(tmp) != self.start:  # replaced between our check and the swap: put it back
            exchange(tmp, self.path)
            raise TaskVecError(
                f"{self.path}: something was put at the output path while writing; it is left as it is and nothing was written"
            )
        moved_into_place(self.path)
        remove_path(tmp)  # what the output replaced, now under the temporary name


def _stat_or_none(path: Path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
