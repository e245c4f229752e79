"""SIGTERM and SIGHUP handled like Ctrl-C, so that whatever stops a command cleans up after it.

Python turns SIGINT into KeyboardInterrupt, and every ``finally`` and
``except BaseException`` on the way up runs: partial outputs are removed, temporary
folders deleted, an MLflow run is ended FAILED. SIGTERM (``kill``, a CI timeout,
``docker stop``) and SIGHUP (a closed terminal) kill the interpreter without any of
that. Inside ``terminate_like_interrupt()`` they raise ``Terminated`` (a
KeyboardInterrupt) instead; a second signal while cleaning up is ignored, so the
cleanup itself is not cut short.

Stages. A command is in one of a few stages: ``checks``, ``writing`` (the partial),
``final-move``, ``logging``, ``registering``, ``tagging``, ``done``. Every command
starts in ``checks`` (``begin_command``); its output claim marks ``writing``,
``final-move`` and ``done`` (engine/output.py), a registration its own stages
(``stages_owned_by``). Up to the final move a signal leaves nothing (the partial is
removed, a run ends FAILED); the move and its record are ``one_step()``, so after it
the message says the output stands. From ``registering`` on (the version exists) the
command finishes first: ``finish_first()`` holds Ctrl-C, SIGTERM and SIGHUP until the
version is complete, its run FINISHED and its alias set, then raises ``Terminated``
saying what stands (so there is never a READY version with a FAILED run). See
docs/signals.md.

Test hook: ``MLFLOW_TASKVEC_TEST_PAUSE=STAGE:FILE`` makes ``stage(STAGE)`` create
``FILE.reached`` and wait until ``FILE`` exists, so a test sends its signal in a
known stage instead of racing a timer; ``STAGE@N:FILE`` pauses the Nth time the command
enters ``STAGE`` (``search --register --output-recipe`` writes its recipe after its
registration: ``writing@2``, ``done@2``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM or SIGHUP; the CLI reports Ctrl-C as SIGINT alike)."""

    def __init__(self, signum: int, stands: str | None = None):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.stands = stands  # what the command finished before it stopped, if anything
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a death by signal


@contextlib.contextmanager
def terminate_like_interrupt():
    """Within the block, SIGTERM and SIGHUP raise ``Terminated`` in the main thread."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def handle(signum, _frame):
        for sig in HANDLED:  # once is enough: let the cleanup finish
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handle) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


STAGES = ("checks", "writing", "final-move", "logging", "registering", "tagging", "done")
PAUSE_ENV = "MLFLOW_TASKVEC_TEST_PAUSE"


_OWNERS: list[str] = []  # who marks the stages now, innermost last (none: the output claim, engine/output.py)
_ENTERED: dict[str, int] = {}  # how many times this command has entered each stage (the test hook's STAGE@N)


def stage(name: str, owner: str | None = None) -> None:
    """Mark the start of stage ``name``; with the test hook set to it, pause there (see above).
    Only the current owner's marks count: inside ``stages_owned_by("registration")`` the output
    claims of the writes a registration makes (into its temporary folder, or its final move to
    ``-o``) mark nothing, and the registration marks its stages itself."""
    if owner != (_OWNERS[-1] if _OWNERS else None):
        return
    _ENTERED[name] = _ENTERED.get(name, 0) + 1
    hook = os.environ.get(PAUSE_ENV, "")
    where, _, release = hook.partition(":")
    wanted, _, nth = where.partition("@")  # STAGE@N: the Nth time the command enters STAGE (a search's recipe after its registration)
    if wanted != name or not release or _ENTERED[name] != (int(nth) if nth.isdigit() else 1):
        return
    with open(f"{release}.reaching", "w", encoding="ascii") as fh:
        fh.write(str(os.getpid()))
    os.replace(f"{release}.reaching", f"{release}.reached")  # whole when it appears: it names the process to signal
    while not os.path.exists(release):  # a signal lands here as it would in the stage's work
        time.sleep(0.01)


@contextlib.contextmanager
def stages_owned_by(owner: str) -> Iterator[None]:
    """Within the block, only ``stage(name, owner=owner)`` marks a stage (see ``stage``)."""
    _OWNERS.append(owner)
    try:
        yield
    finally:
        _OWNERS.pop()


_HOLDING: list["_Held"] = []  # the holds in force now


class _Held:
    def __init__(self):
        self.signum: int | None = None
        self.stands = None
        self.completed_before = 0  # inside extend_hold(): how many registrations were complete before its first one
        self.previous: dict | None = None  # the handlers replaced while holding

    def hold(self, signum, _frame):
        if self.signum is None:
            self.signum = signum

    def start(self) -> None:
        if self.previous is None:
            self.previous = {sig: signal.signal(sig, self.hold) for sig in (signal.SIGINT, *HANDLED)}
            _HOLDING.append(self)

    def stop(self) -> None:
        if self.previous is not None:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = None
            _HOLDING.remove(self)


@contextlib.contextmanager
def one_step() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then raise ``Terminated``: for a
    step a signal must not cut in two (the final move and its record, so that a message never
    says "no output" beside an output that stands). Inside a hold already in force, it adds none."""
    if threading.current_thread() is not threading.main_thread() or _HOLDING:
        yield
        return
    held = _Held()
    held.start()
    replaced = dict(held.previous)
    try:
        yield
    finally:
        held.stop()
    if held.signum is None or replaced[held.signum] == signal.SIG_IGN:
        return
    if replaced[held.signum] == signal.SIG_DFL:  # outside the CLI's handling: what the signal would have done
        os.kill(os.getpid(), held.signum)
        return
    raise Terminated(held.signum)


_EXTENDED: list[_Held] = []  # open extend_hold() blocks, innermost last


@contextlib.contextmanager
def finish_first(stands: "callable") -> Iterator[None]:
    """Within the block, Ctrl-C, SIGTERM and SIGHUP are held, not raised; after it, the first one
    held raises ``Terminated`` whose ``stands`` is ``stands()``: what the block completed.
    Inside ``extend_hold()`` the signal stays held until that block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = _EXTENDED[-1] if _EXTENDED else _Held()
    held.start()
    try:
        yield
    except BaseException:
        if not _EXTENDED:
            held.stop()
        raise
    if _EXTENDED:
        if held.stands is None:  # the first registration of the block says what finished first
            held.stands, held.completed_before = stands, len(_COMPLETED)
        return  # the enclosing extend_hold() raises, once what encloses the registration (its run) is complete
    held.stands = stands
    held.stop()
    if held.signum is not None:
        raise Terminated(held.signum, stands())


@contextlib.contextmanager
def extend_hold() -> Iterator[None]:
    """A signal that a ``finish_first()`` inside the block held stays held to the block's end
    (e.g. until the run that holds a registered version has ended FINISHED); signals before
    any ``finish_first()`` are raised as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = _Held()
    _EXTENDED.append(held)
    try:
        yield
    finally:
        _EXTENDED.remove(held)
        held.stop()
    if held.signum is not None:
        raise Terminated(held.signum, _extended_stands(held))


def _extended_stands(held: _Held) -> str | None:
    """What an ``extend_hold()`` block completed: its first registration, as that registration says
    it (it finished first), then the registrations completed after it in the block (a leaderboard's
    next winners)."""
    if held.stands is None:
        return None
    later = [what for what, _ in _COMPLETED[held.completed_before + 1 :]]
    return "; ".join([held.stands(), *later])


_MOVED: list[str] = []  # outputs moved into place by this command (engine/output.py)
# registrations this command completed, in words (mlflow/registry.py), each with how many of _MOVED
# were in place when it completed (those its words name)
_COMPLETED: list[tuple[str, int]] = []


def begin_command() -> None:
    """A command starts (in its ``checks`` stage): nothing of an earlier one (in this process) stands for it."""
    _MOVED.clear()
    _COMPLETED.clear()
    _ENTERED.clear()
    stage("checks")


def completed(what: str) -> None:
    """Record, in words, a registration that is complete (its version READY, its run FINISHED);
    ``what`` names the outputs moved into place before it (its composite or vector at ``-o``)."""
    _COMPLETED.append((what, len(_MOVED)))


def moved_into_place(path) -> None:
    """Record that ``path`` now stands complete (a signal from now on must not say "no output")."""
    _MOVED.append(os.fspath(path))


def standing() -> list[str]:
    """The outputs moved into place that still stand (temporary ones removed since are not listed)."""
    return [p for p in dict.fromkeys(_MOVED) if os.path.lexists(p)]


def what_stands() -> str | None:
    """What a signal now would leave, in words (the completed registrations, which name their
    outputs, then the outputs written after them that stand, such as a search's recipe written
    after its winner's registration); None when nothing does."""
    named = set(_MOVED[: _COMPLETED[-1][1]]) if _COMPLETED else set()
    outputs = [p for p in standing() if p not in named]
    parts = [*(what for what, _ in _COMPLETED), *([f"{', '.join(outputs)} was written whole before it and stands"] if outputs else [])]
    return "; ".join(parts) or None
