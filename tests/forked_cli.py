"""The ``mlflow-taskvec`` command in a fresh process per call, without paying the imports each time.

The fault tests run a command once per stage and signal (dozens of processes); starting
Python and importing torch and MLflow is most of each one's time. ``CommandForks`` starts
one process that imports the command's modules (and reads MLflow's map of the installed
packages) and nothing else (no run, no store, no thread of ours), then forks a real process for each command a test asks for: its own
pid, environment, working folder, stdout and stderr files, and the CLI's own signal
handling; the test signals that pid as it would any command. Each command is forked
by a small waiter (itself forked from the server) that records the exit status the
way a shell reports it (128 + N for a death by signal N).

Run as a script, this file is the server: it reads one JSON request per line on stdin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = (
    "torch", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store", "matplotlib.pyplot",
    "mlflow_taskvec.cli", "mlflow_taskvec.mlflow.registry", "mlflow_taskvec.mlflow.inputs", "mlflow_taskvec.mlflow.lineage_plot",
    "mlflow_taskvec.similarity", "mlflow_taskvec.engine.lora",
)  # fmt: skip
OPTIONAL_PRELOAD = ("transformers", "peft", "mlflow.transformers")  # a PEFT composite's registration (the dev extras): when installed


@dataclass
class Forked:
    """One command forked by the server: where its streams and its exit status go."""

    folder: Path
    args: tuple[str, ...] = ()

    @property
    def status_file(self) -> Path:
        return self.folder / "status"

    def wait(self, timeout: float = 120) -> tuple[int, str, str]:
        """``(exit status, stdout, stderr)`` once the command has ended (the waiter writes the status last)."""
        deadline = time.monotonic() + timeout
        while not self.status_file.exists():  # an event (the command's end), not a timing window
            assert time.monotonic() < deadline, f"the command did not end within {timeout} s"
            time.sleep(0.01)
        status = int(self.status_file.read_text("ascii"))
        return status, (self.folder / "stdout").read_text("utf-8"), (self.folder / "stderr").read_text("utf-8")

    def completed(self, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ended command as ``subprocess.run`` reports one."""
        return subprocess.CompletedProcess(list(self.args), *self.wait(timeout))


class CommandForks:
    """The fork server; ``start(args, env, cwd, folder)`` forks one command."""

    def __init__(self, folders: Path | None = None):
        self.folders, self.started = folders, 0  # where start() puts a command's folder when given none
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        ready = self.proc.stdout.readline()
        assert ready.strip() == "ready", ready

    def start(self, args: list, env: dict, cwd: Path, folder: Path | None = None) -> Forked:
        self.started += 1
        folder = folder or self.folders / f"command-{self.started}"
        folder.mkdir(parents=True, exist_ok=True)
        request = {"args": [str(a) for a in args], "env": env, "cwd": str(cwd), "folder": str(folder)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "forked"
        return Forked(folder, tuple(request["args"]))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _run_command(request: dict) -> None:
    """In the forked command: its environment, folder and streams, then the CLI; never returns."""
    code = 1
    try:
        # The dispositions of a command started from a terminal, whatever the server inherited
        # (a background job starts with SIGINT ignored, and Python then leaves it ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        folder = Path(request["folder"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
        from mlflow_taskvec.cli import main

        try:
            main.main(args=request["args"], prog_name="mlflow-taskvec")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _wait_for(pid: int, folder: Path) -> None:
    """In the waiter: the command's exit status, as a shell reports it, written last."""
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    tmp = folder / "status.tmp"
    tmp.write_text(str(128 - code if code < 0 else code), "ascii")
    os.replace(tmp, folder / "status")


def _serve() -> None:
    import importlib

    import matplotlib

    matplotlib.use("Agg")  # as the commands that draw choose it, before pyplot is imported
    for module in PRELOAD:
        importlib.import_module(module)
    for module in OPTIONAL_PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:  # the tests that need it skip (or fail in CI) themselves
            pass
    # MLflow maps the installed packages to their modules (a walk over every distribution's files,
    # 1-2 s) the first time a process logs a model, to check the model's requirements; the map is
    # the same for every command forked from here, so it is read once, like the imports.
    from mlflow.utils import requirements_utils

    read_the_map = getattr(requirements_utils, "_init_packages_to_modules_map", None)  # MLflow's own, private: only a speed-up
    if read_the_map is not None:
        read_the_map()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if os.fork() == 0:  # the waiter
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:
                _run_command(request)
            try:
                _wait_for(pid, Path(request["folder"]))
            finally:
                os._exit(0)
        print("forked", flush=True)


if __name__ == "__main__":
    _serve()
