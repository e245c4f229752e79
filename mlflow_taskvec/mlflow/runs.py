"""The MLflow runs a command starts: tagged with the process that owns them, so that one left
RUNNING by a process that died (SIGKILL, or a tracking server that went away, so the run could
not be ended) is ended by the next command that reaches the server.

A run this package starts or resumes carries ``taskvec.process`` = ``host:pid:start`` (the
process's start time, so a reused pid is not mistaken for it). Before it starts another, a
command ends every RUNNING run of its experiment whose process on this host is gone: FAILED,
or the status a resumed run had before. Processes on other hosts cannot be checked and are
left alone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.errors import TaskVecWarning
from mlflow_taskvec.mlflow import tags as tag


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def process_identity(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def is_gone(identity: str) -> bool:
    """Whether the process ``identity`` names has certainly ended (False when it cannot be told)."""
    try:
        host, pid_text, start = identity.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    return bool(start) and _start_time(pid) != start  # the pid was reused by another process


def end_runs_of_gone_processes(experiment_id: str, keep: str) -> list[str]:
    """End the experiment's RUNNING runs whose owning process on this host is gone; their ids."""
    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    try:
        runs = client.search_runs(
            [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{tag.RUN_PROCESS}` LIKE '{host}:%'", max_results=200
        )
    except MlflowException:
        return []  # a search the server cannot answer must not stop the command
    ended = []
    for run in runs:
        owner = run.data.tags.get(tag.RUN_PROCESS, "")
        if run.info.run_id == keep or not is_gone(owner):
            continue
        status = run.data.tags.get(tag.RUN_STATUS_BEFORE) or "FAILED"
        with contextlib.suppress(MlflowException):
            client.set_terminated(run.info.run_id, status)
            ended.append(run.info.run_id)
            warnings.warn(
                TaskVecWarning(
                    f"run {run.info.run_id} was left RUNNING by process {owner.split(':')[1]}, which has ended; it is now {status}"
                ),
                stacklevel=2,
            )
    return ended


@contextlib.contextmanager
def owned_run(run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Resume ``run_id``, keep the active run, or start a new one (ended FAILED if the block fails).

    A resumed run that had ended gets its status back, whether the block succeeded or failed (a
    KILLED fine-tune run stays KILLED when its vector is registered into it; a FINISHED one stays
    FINISHED when that registration fails or is interrupted).

    A run it starts or resumes is tagged with this process; runs of gone processes in the
    same experiment are ended first (see the module's docstring).
    """
    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        yield active
        return
    before = MlflowClient().get_run(run_id).info.status if run_id is not None else None
    try:
        with mlflow.start_run(run_id=run_id) as run:
            mlflow.set_tags({tag.RUN_PROCESS: process_identity(), **({tag.RUN_STATUS_BEFORE: before} if before else {})})
            end_runs_of_gone_processes(run.info.experiment_id, keep=run.info.run_id)
            yield run
    finally:
        if before:  # the run is as it was, but for what was logged into it: its status too, whether the block failed or not
            with contextlib.suppress(MlflowException):
                MlflowClient().delete_tag(run_id, tag.RUN_STATUS_BEFORE)
                if before in ("FINISHED", "FAILED", "KILLED"):  # (one RUNNING elsewhere ends FINISHED, so no later command takes it for an orphan)
                    MlflowClient().update_run(run_id, status=before)


def log_to_enclosing_run(path: "str | os.PathLike") -> bool:
    """Log the file ``path`` to the run an ``mlflow run`` step runs in (``MLFLOW_RUN_ID``), if any;
    returns whether it did."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return False
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(path))
    return True
