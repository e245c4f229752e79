"""SIGTERM and SIGHUP handled like Ctrl-C, so that whatever stops a command cleans up after it.

Python turns SIGINT into KeyboardInterrupt, and every ``finally`` and
``except BaseException`` on the way up runs: partial outputs are removed, temporary
folders deleted, an MLflow run is ended FAILED. SIGTERM (``kill``, a CI timeout,
``docker stop``) and SIGHUP (a closed terminal) kill the interpreter without any of
that. Inside ``terminate_like_interrupt()`` they raise ``Terminated`` (a
KeyboardInterrupt) instead; a second signal while cleaning up is ignored, so the
cleanup itself is not cut short.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM or SIGHUP; the CLI reports Ctrl-C as SIGINT alike)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
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
