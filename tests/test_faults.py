"""Faults around a write: a second writer, things appearing at the output, signals, a full disk.

Each test runs the real command (a subprocess where a signal or a second process is
the point) on real files, and checks that nothing was lost: the inputs' bytes
unchanged, no partial files or lock files left, and anything a user put at the
output path kept as it was. The full-disk tests write to a real 2 MB tmpfs, which
needs root to mount (skipped otherwise, and a failure when ``CI`` is set). The signal
tests pause each command in each of its stages (the test hook of docs/signals.md) and
signal it there; the registrations run on sqlite and on a PostgreSQL-backed team server
started once for this module (missing PostgreSQL: a skip, a failure when ``CI`` is set).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import leftovers
from forked_cli import CommandForks
from safetensors.torch import load_file, save_file
from team_server import skip_or_fail

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.engine import TaskVector, merge_to, open_checkpoint
from mlflow_taskvec.engine.output import OutputClaim
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.recipe import load_recipe
from mlflow_taskvec.signals import PAUSE_ENV

# about 190 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(200)

ROOT = Path(__file__).resolve().parents[1]


def sha256_of(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def model(seed: int, tensors: int, numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(numel, generator=g) for i in range(tensors)}


def write_inputs(folder: Path, tensors: int = 4, numel: int = 1024) -> tuple[Path, Path, Path]:
    """A base, a fine-tune of it, and a recipe adding the fine-tune's vector; in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = model(0, tensors, numel)
    save_file(base, str(folder / "base.safetensors"))
    save_file({n: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for n, t in base.items()}, str(folder / "ft.safetensors"))
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": "base.safetensors", "scale": 0.5, "vectors": [{"finetuned": "ft.safetensors"}]}), "utf-8")
    return folder / "base.safetensors", folder / "ft.safetensors", recipe


def command(*args) -> list[str]:
    return [sys.executable, "-m", "mlflow_taskvec.cli", *map(str, args)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


# -- two writers, and things appearing at the output ---------------------------------------------


def test_a_second_writer_of_the_same_output_fails_at_once_with_one_line(tmp_path):
    base, ft, recipe = write_inputs(tmp_path / "in")
    out = tmp_path / "out" / "merged.safetensors"
    digests = sha256_of(base, ft)
    first = OutputClaim(out)  # a writer holding the output, as a running compose does
    try:
        started = time.monotonic()
        proc = subprocess.run(command("compose", recipe, "-o", out), env=env(), capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    finally:
        first.release()

    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert f"{out}: another writer is writing this output (process {os.getpid()}); wait for it to finish" in line
    assert seconds < 30  # it did not wait for the lock (the interpreter's start-up is most of this)
    assert not out.exists() and leftovers(out.parent) == []
    assert sha256_of(base, ft) == digests


def test_the_lock_is_released_and_its_file_removed_after_a_write(tmp_path):
    base, ft, recipe = write_inputs(tmp_path / "in")
    out = tmp_path / "out" / "merged.safetensors"

    assert CliRunner().invoke(cli, ["compose", str(recipe), "-o", str(out)]).exit_code == 0
    assert CliRunner().invoke(cli, ["compose", str(recipe), "-o", str(out), "--overwrite"]).exit_code == 0

    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.safetensors"]


def _vector(tmp_path) -> tuple[Path, TaskVector]:
    base, ft, _ = write_inputs(tmp_path / "in")
    return base, TaskVector.extract(base, ft)


@pytest.mark.parametrize("output_name", ["merged", "merged.safetensors"])
def test_a_folder_created_at_the_output_while_writing_is_kept_and_nothing_written(tmp_path, output_name):
    base, vector = _vector(tmp_path)
    out = tmp_path / "out" / output_name

    def someone_creates_the_output(_name):
        if not out.exists():
            out.mkdir()
            (out / "important.txt").write_text("precious", "utf-8")

    with pytest.raises(TaskVecError, match="something was put at the output path while writing; it is left as it is and nothing was written") as info:
        merge_to(base, [vector], [1.0], output=out, progress=someone_creates_the_output)

    assert str(info.value).startswith(f"{out}: ")
    assert sorted(p.name for p in out.iterdir()) == ["important.txt"]
    assert (out / "important.txt").read_text("utf-8") == "precious"
    assert leftovers(out.parent) == []


def test_even_an_empty_folder_created_at_the_output_while_writing_is_not_replaced(tmp_path):
    base, vector = _vector(tmp_path)
    out = tmp_path / "out" / "merged"

    with pytest.raises(TaskVecError, match="something was put at the output path while writing"):
        merge_to(base, [vector], [1.0], output=out, progress=lambda _name: out.mkdir(exist_ok=True))

    assert out.is_dir() and list(out.iterdir()) == []
    assert leftovers(out.parent) == []


def test_overwrite_replaces_only_what_was_there_at_the_start(tmp_path):
    base, vector = _vector(tmp_path)
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the old output")

    def someone_replaces_it(_name):
        if out.read_bytes() != b"the old output":
            return
        replacement = out.parent / "new.tmp"
        replacement.write_bytes(b"someone else's file")
        os.replace(replacement, out)

    with pytest.raises(TaskVecError, match="something was put at the output path while writing"):
        merge_to(base, [vector], [1.0], output=out, overwrite=True, progress=someone_replaces_it)

    assert out.read_bytes() == b"someone else's file"
    assert leftovers(out.parent) == []


def test_overwrite_replaces_what_was_there_at_the_start_whole(tmp_path):
    base, vector = _vector(tmp_path)
    out = tmp_path / "out" / "merged"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "checkpoint-500" / "optimizer.pt").write_bytes(b"old state")

    result = merge_to(base, [vector], [1.0], output=out, overwrite=True)

    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert open_checkpoint(out).fingerprint() == result.fingerprint
    assert leftovers(out.parent) == []


def test_partials_left_by_a_killed_writer_are_removed_by_the_next_write_to_that_output(tmp_path):
    base, ft, recipe = write_inputs(tmp_path / "in")
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    stale = [out.parent / ".merged.partial-999999-0123abcd", out.parent / ".merged.partial-89abcdef"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half a model")
    stale[1].write_bytes(b"an older version's partial")
    unrelated = [out.parent / ".other.partial-999999-0123abcd", out.parent / ".merged.partial-notours"]
    for path in unrelated:
        path.write_bytes(b"not this output's")

    result = CliRunner().invoke(cli, ["compose", str(recipe), "-o", str(out)])

    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in unrelated)


# -- signals: the test hook pauses the command in a stage, the test signals it there ------------
#
# Every command that writes an output passes through named stages (docs/signals.md); with
# MLFLOW_TASKVEC_TEST_PAUSE=STAGE:FILE it creates FILE.reached (naming its pid) on entering
# STAGE and waits there until FILE exists. Each row starts the command paused in one stage,
# sends it one signal, releases it and checks the stage's one documented outcome: no timer,
# no race. The commands are forked by one server that has imported torch and MLflow
# (tests/forked_cli.py): a real process each, without a second of imports per row.

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
NOTHING = "temporary files were removed and no output was written"


@pytest.fixture(scope="module")
def forks():
    server = CommandForks()
    yield server
    server.close()


def tree_digests(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file of a folder (by relative name)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _paused_at(forks, folder: Path, args: list, stage: str, store_env: dict):
    """Fork the command paused at ``stage``; returns it, its pid and the file that releases it."""
    release = folder / "release"
    run = forks.start(args, {**store_env, PAUSE_ENV: f"{stage}:{release}"}, cwd=folder, folder=folder / "command")
    reached = Path(f"{release}.reached")
    while not reached.exists():  # waits for the command to reach the stage: an event, not a timing window
        if run.status_file.exists():
            pytest.fail(f"the command ended before reaching {stage}: {run.wait()}")
        time.sleep(0.01)
    return run, int(reached.read_text("ascii")), release



def _signalled_in(forks, folder: Path, args: list, stage: str, store_env: dict, signum) -> tuple[int, str, str]:
    """Fork the command paused at ``stage``, send it ``signum`` there, release it; its status, stdout and stderr."""
    run, pid, release = _paused_at(forks, folder, args, stage, store_env)
    os.kill(pid, signum)
    release.touch()
    return run.wait()

@pytest.fixture(scope="module")
def signal_inputs(tmp_path_factory) -> Path:
    """A base (2-D weights and a bias), two fine-tunes, their task vectors and a recipe."""
    folder = tmp_path_factory.mktemp("signal-inputs")
    g = torch.Generator().manual_seed(0)
    base = {**{f"layers.{i}.weight": torch.randn(16, 8, generator=g) for i in range(3)}, "layers.0.bias": torch.randn(16, generator=g)}
    save_file(base, str(folder / "base.safetensors"))
    for name in ("ft", "other"):
        save_file({n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}, str(folder / f"{name}.safetensors"))
        TaskVector.extract(folder / "base.safetensors", folder / f"{name}.safetensors").save(folder / f"{name}.tv.safetensors")
    (folder / "recipe.yaml").write_text("base: base.safetensors\nscale: 0.5\nvectors: [{finetuned: ft.safetensors}, {vector: other.tv.safetensors}]\n", "utf-8")
    from mlflow_helpers import BASE_NAME, vector_name

    # a search of one candidate over the `registry` store's base and vector (search_evaluators: no data)
    (folder / "search.yaml").write_text(yaml.safe_dump({
        "base": f"models:/{BASE_NAME}/1", "vectors": [{"vector": f"models:/{vector_name('rotate')}/1"}],
        "evaluation": {"evaluator": "search_evaluators:weight_norm", "tasks": ["rotate"], "references": False},
        "search": {"objective": "mean.accuracy", "scale": {"low": 0.5, "high": 0.5, "step": 0.5}},
    }), "utf-8")
    return folder


# Every command that writes an output, with its arguments ({in}: the inputs, {out}: the output, {composite}: the
# `registry`'s composite) and the output's name.
OUTPUT_COMMANDS = {
    "compose": (["compose", "{in}/recipe.yaml", "-o", "{out}"], "merged"),
    "compose-file": (["compose", "{in}/recipe.yaml", "-o", "{out}"], "merged.safetensors"),
    "extract": (["extract", "--base", "{in}/base.safetensors", "--finetuned", "{in}/ft.safetensors", "-o", "{out}"], "vector.safetensors"),
    "compress-sparse": (["compress", "{in}/ft.tv.safetensors", "--format", "sparse", "--density", "0.5", "-o", "{out}"], "sparse.safetensors"),
    "compress-lowrank": (["compress", "{in}/ft.tv.safetensors", "--format", "lowrank", "--rank", "2", "-o", "{out}"], "lowrank.safetensors"),
    "export-lora": (["export-lora", "{in}/ft.tv.safetensors", "--rank", "2", "-o", "{out}"], "adapter"),
    "similarity-heatmap": (["similarity", "{in}/ft.tv.safetensors", "{in}/other.tv.safetensors", "--heatmap", "{out}"], "heatmap.png"),
    "compose-peft": (["compose", "{in}/recipe.yaml", "--format", "peft", "--rank", "2", "-o", "{out}"], "adapter"),
    "lineage-picture": (["lineage", "models:/{composite}/1", "--format", "png", "-o", "{out}"], "lineage.png"),
    "lineage-file": (["lineage", "models:/{composite}/1", "--format", "json", "-o", "{out}"], "lineage.json"),  # text and dot: the same write
    # streamed: its candidates' temporary composites mark none of the command's stages
    "search-recipe": (["search", "{in}/search.yaml", "--memory", "streamed", "-q", "--output-recipe", "{out}"], "best.yaml"),
}
ON_THE_STORE = {"lineage-picture", "lineage-file", "search-recipe"}  # they read the module's sqlite `registry` (its search's runs are its own)
# Up to the final move nothing is left; once it is done the output stands whole (docs/signals.md).
OUTPUT_STAGES = {"checks": "nothing", "writing": "nothing", "final-move": "nothing", "done": "stands"}


def _output_args(command: str, inputs: Path, out: Path) -> list[str]:
    from mlflow_helpers import COMPOSITE_NAME

    args, _ = OUTPUT_COMMANDS[command]
    return [a.replace("{in}", str(inputs)).replace("{out}", str(out)).replace("{composite}", COMPOSITE_NAME) for a in args]


def _output_env(request, command: str) -> dict:
    """The command's environment: the module's sqlite ``registry`` for those that read a store."""
    return request.getfixturevalue("registry").store.env() if command in ON_THE_STORE else env()


@pytest.fixture(scope="module")
def uninterrupted(request, forks, signal_inputs, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Each command's output written without a signal: the digests an interrupted output that stands must have."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for command, (_, name) in OUTPUT_COMMANDS.items():
        (root / command / "out").mkdir(parents=True)
        args = _output_args(command, signal_inputs, root / command / "out" / name)
        runs[command] = forks.start(args, _output_env(request, command), cwd=root / command, folder=root / command / "command")
    digests = {}
    for command, run in runs.items():
        status, _, stderr = run.wait()
        assert status == 0, stderr
        digests[command] = tree_digests(root / command / "out" / OUTPUT_COMMANDS[command][1])
    return digests


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
@pytest.mark.parametrize("stage", list(OUTPUT_STAGES))
@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
def test_a_signal_in_each_stage_of_a_commands_write_has_its_one_outcome(request, tmp_path, forks, signal_inputs, uninterrupted, command, stage, signum):
    inputs_before = {p.name: tree_digests(p) for p in signal_inputs.iterdir()}
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / OUTPUT_COMMANDS[command][1]

    run, pid, release = _paused_at(forks, tmp_path, _output_args(command, signal_inputs, output), stage, _output_env(request, command))
    partial_at_the_signal = leftovers(output.parent)
    os.kill(pid, signum)
    release.touch()
    status, stdout, stderr = run.wait()

    assert status == 128 + signum, stderr
    line = one_error_line(stderr)
    if OUTPUT_STAGES[stage] == "nothing":
        assert line == f"Error: interrupted by {signum.name}; {NOTHING}"
        assert not output.exists()
        # the signal landed while the partial existed (from writing on) and still took it away
        assert any(".partial-" in p for p in partial_at_the_signal) == (stage != "checks")
    else:  # the final move is done: the output stands, whole, and the message says so
        assert line == f"Error: interrupted by {signum.name}; {output} was written whole before it and stands"
        assert tree_digests(output) == uninterrupted[command]
    assert stdout == ""  # similarity too: it prints its table once the heatmap is written
    assert leftovers(output.parent) == [] and sorted(p.name for p in output.parent.iterdir()) == ([output.name] if output.exists() else [])
    assert {p.name: tree_digests(p) for p in signal_inputs.iterdir()} == inputs_before


def test_after_a_sigkill_in_the_writing_stage_the_next_compose_removes_the_partial(tmp_path, forks, signal_inputs):
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "merged"
    args = _output_args("compose", signal_inputs, output)

    run, pid, _ = _paused_at(forks, tmp_path, args, "writing", env())
    os.kill(pid, signal.SIGKILL)
    assert run.wait()[0] == 128 + signal.SIGKILL
    assert any(".partial-" in p for p in leftovers(output.parent))  # SIGKILL cannot be handled: its partial stays ...
    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    assert leftovers(output.parent) == []  # ... until the next write to that output
    assert sorted(p.name for p in output.parent.iterdir()) == ["merged"]


_ONE_STEP = """
import os, signal, sys
from mlflow_taskvec.signals import Terminated, one_step, terminate_like_interrupt
handled = sys.argv[1] == "handled"
with terminate_like_interrupt() if handled else open(os.devnull):
    try:
        with one_step():
            os.kill(os.getpid(), signal.SIGTERM)
            print("the step ended", flush=True)
    except Terminated as stopped:
        print(f"then {stopped.name} was raised", flush=True)
        sys.exit(3)
print("after the step", flush=True)
"""


@pytest.mark.parametrize("handled", [True, False], ids=["the-cli-handles-sigterm", "sigterm-by-default"])
def test_a_signal_during_one_step_waits_for_the_step_then_does_what_it_would_have(handled):
    proc = subprocess.run([sys.executable, "-c", _ONE_STEP, "handled" if handled else "default"], env=env(), capture_output=True, text=True, timeout=60)

    if handled:  # the CLI's handling: raised as Terminated once the step is done (the final move and its record)
        assert (proc.returncode, proc.stdout) == (3, "the step ended\nthen SIGTERM was raised\n")
    else:  # outside it: the process still dies by the signal, after the step
        assert (proc.returncode, proc.stdout) == (-signal.SIGTERM, "the step ended\n")


def test_sigterm_in_an_optuna_trial_is_one_line_without_optunas_traceback(tmp_path, registry):
    from mlflow_helpers import BASE_NAME, vector_name

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": f"models:/{BASE_NAME}/1", "vectors": [{"vector": f"models:/{vector_name('rotate')}/1"}],
        "evaluation": {"evaluator": "search_evaluators:stops_itself", "tasks": ["rotate"]},
        "search": {"strategy": "optuna", "trials": 2},
    }), "utf-8")
    tests = str(ROOT / "tests")
    searches = "tags.`taskvec.search.role` = 'search'"
    before = {r.info.run_id for r in registry.store.client.search_runs([registry.store.experiment_id], filter_string=searches)}  # the search rows' own

    proc = subprocess.run(
        command("search", recipe), env=registry.store.env(PYTHONPATH=os.pathsep.join([env()["PYTHONPATH"], tests])),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )

    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert one_error_line(proc.stderr).startswith("Error: interrupted by SIGTERM")
    runs = registry.store.client.search_runs([registry.store.experiment_id], filter_string=searches)
    assert [r.info.status for r in runs if r.info.run_id not in before] == ["FAILED"]


# -- a signal in each stage of compose --register, on sqlite and on the PostgreSQL team server -----

# Up to the version's creation a signal leaves nothing; from then on the command completes the
# registration first (version, output, alias, run FINISHED) and then says so; once it is done,
# the message says what is complete (docs/signals.md).
REGISTRATION_STAGES = {
    "checks": "nothing", "writing": "nothing", "logging": "nothing",
    "registering": "finished first", "final-move": "finished first", "tagging": "finished first", "done": "complete",
}


@dataclass
class Backend:
    """Where a registration goes: the command's environment, and a client (inside ``admin()``) to check it."""

    env: dict
    experiment_id: str
    client: object
    admin: object = contextlib.nullcontext


@pytest.fixture(scope="module")
def team_registry(tmp_path_factory):
    """The PostgreSQL team server (tests/team_server.py), started once for this module, with the
    digits registry (base, task vectors) built on it by its admin; stopped and dropped after."""
    from mlflow.tracking import MlflowClient
    from mlflow_helpers import Store, build_registry
    from team_server import ADMIN_USER, start_server

    root = tmp_path_factory.mktemp("faults-team-server")
    server = start_server(root / "server")
    try:
        with server.as_user(ADMIN_USER):
            experiment_id = MlflowClient().create_experiment("faults")
            with server.as_user(ADMIN_USER, MLFLOW_EXPERIMENT_ID=experiment_id, MLFLOW_TASKVEC_CACHE=str(root / "cache")):
                client = MlflowClient()
                build_registry(Store(root, server.url, experiment_id, root / "cache", root / "artifacts", client))
        yield Backend(server.env(ADMIN_USER, MLFLOW_EXPERIMENT_ID=experiment_id, MLFLOW_TASKVEC_CACHE=str(root / "cache")),
                      experiment_id, client, lambda: server.as_user(ADMIN_USER))
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> Backend:
    if request.param == "sqlite":
        store = request.getfixturevalue("registry").store
        return Backend(store.env(), store.experiment_id, store.client)
    return request.getfixturevalue("team_registry")


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
@pytest.mark.parametrize("stage", list(REGISTRATION_STAGES))
def test_a_signal_in_each_stage_of_a_registration_has_its_one_outcome(tmp_path, forks, backend, stage, signum):
    from mlflow_helpers import BASE_NAME, vector_name

    name = f"staged-{stage}-{signum.name}".lower()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": f"models:/{BASE_NAME}/1", "vectors": [{"vector": f"models:/{vector_name('rotate')}/1"}]}), "utf-8")
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "composite"
    with backend.admin():
        runs_before = {r.info.run_id for r in backend.client.search_runs([backend.experiment_id])}

    args = ["compose", recipe, "--register", name, "--alias", "champion", "-o", output]
    status, stdout, stderr = _signalled_in(forks, tmp_path, args, stage, backend.env, signum)

    _check_registration_outcome(backend, name, stage, signum, runs_before, output, status, stdout, stderr)


def _check_registration_outcome(backend: Backend, name: str, stage: str, signum, runs_before: set, output: Path, status: int, stdout: str, stderr: str) -> None:
    """``compose --register NAME --alias champion -o OUTPUT`` signalled in ``stage`` did what REGISTRATION_STAGES says."""
    from mlflow_taskvec.engine.adapter_merge import adapter_delta_fingerprint
    from mlflow_taskvec.engine.checkpoint import is_adapter
    from mlflow_taskvec.mlflow.downloads import resolve

    assert status == 128 + signum, stderr
    line = one_error_line(stderr)
    with backend.admin():
        new_runs = {r.info.run_id: r.info.status for r in backend.client.search_runs([backend.experiment_id]) if r.info.run_id not in runs_before}
        versions = backend.client.search_model_versions(f"name = '{name}'")
        # never a READY version beside a FAILED run
        assert all(new_runs.get(v.run_id) == "FINISHED" for v in versions if v.status == "READY"), (versions, new_runs)
        if REGISTRATION_STAGES[stage] == "nothing":
            assert line == f"Error: interrupted by {signum.name}; {NOTHING}"
            assert versions == [] and not output.exists()
            assert set(new_runs.values()) == ({"FAILED"} if stage != "checks" else set())
        else:
            (run_id,) = {v.run_id for v in versions}
            stands = f"models:/{name}/1 is complete and its run {run_id} ended FINISHED; the composite stands at {output}"
            first = "it finished the registration first: " if REGISTRATION_STAGES[stage] == "finished first" else ""
            assert line == f"Error: interrupted by {signum.name}; {first}{stands}"
            assert [(str(v.version), v.status) for v in versions] == [("1", "READY")]
            assert str(backend.client.get_model_version_by_alias(name, "champion").version) == "1"
            assert list(new_runs.values()) == ["FINISHED"]
            if is_adapter(output):  # the adapter as composed; the version holds the copy PEFT saves of it: the same deltas
                assert adapter_delta_fingerprint(output) == adapter_delta_fingerprint(resolve(f"models:/{name}/1").path)
            else:
                assert open_checkpoint(output).fingerprint(fresh=True) == versions[0].tags["taskvec.fingerprint"]
    assert stdout == "" and leftovers(output.parent) == []  # MLflow's links to the run, too, only on a terminal


@pytest.fixture(scope="module")
def tiny_hf_inputs(tmp_path_factory) -> Path:
    """A one-layer BERT of width 8 with a tokenizer (a Hugging Face folder, ``base``), a fine-tune
    of it and a recipe adding its vector: the smallest base a PEFT composite registers on."""
    from team_server import import_or_skip_or_fail

    transformers = import_or_skip_or_fail("transformers", "pip install -e '.[dev]'")
    import_or_skip_or_fail("peft", "pip install -e '.[dev]'")
    folder = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(folder / "base")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]) + "\n", "utf-8")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder / "base")
    g = torch.Generator().manual_seed(1)
    base = load_file(str(folder / "base" / "model.safetensors"))
    save_file({n: t + 0.1 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in base.items()}, str(folder / "ft.safetensors"))
    (folder / "recipe.yaml").write_text("base: base\nvectors: [{finetuned: ft.safetensors}]\n", "utf-8")
    return folder


# compose --format peft --register goes through the same registration (registry.register_composite),
# the adapter composed in writing and logged with mlflow.transformers in logging: SIGTERM in each of
# its stages on the team server, and on sqlite in each of its three outcomes (the other signals and
# sqlite's other stages are those of the rows above).
PEFT_REGISTRATION_ROWS = [("sqlite", stage) for stage in ("writing", "logging", "registering")] + [("postgresql", stage) for stage in REGISTRATION_STAGES]


@pytest.mark.parametrize("backend, stage", PEFT_REGISTRATION_ROWS, indirect=["backend"], ids=[f"{b}-{stage}" for b, stage in PEFT_REGISTRATION_ROWS])
def test_a_signal_in_each_stage_of_a_peft_registration_has_its_one_outcome(tmp_path, forks, backend, tiny_hf_inputs, stage):
    name = f"staged-peft-{stage}"
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "adapter"
    inputs_before = {p.name: tree_digests(p) for p in tiny_hf_inputs.iterdir()}
    with backend.admin():
        runs_before = {r.info.run_id for r in backend.client.search_runs([backend.experiment_id])}
    args = ["compose", tiny_hf_inputs / "recipe.yaml", "--format", "peft", "--rank", "2", "--register", name, "--alias", "champion", "-o", output]

    status, stdout, stderr = _signalled_in(forks, tmp_path, args, stage, backend.env, signal.SIGTERM)

    if stage == "done":  # the registration was complete, and its warning printed, before the signal: the inputs are local
        warning, stderr = stderr.split("\n", 1)
        assert warning.startswith(f"Warning: models:/{name}/1 names local paths (base and 1 more) that verify on another machine cannot fetch")
    _check_registration_outcome(backend, name, stage, signal.SIGTERM, runs_before, output, status, stdout, stderr)
    assert sorted(p.name for p in output.parent.iterdir()) == (["adapter"] if REGISTRATION_STAGES[stage] != "nothing" else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command", "out", "release", "release.reached"]
    assert {p.name: tree_digests(p) for p in tiny_hf_inputs.iterdir()} == inputs_before


# search --register NAME --output-recipe FILE: the winner registers first (compose --register's stages,
# without -o), the search's own run ends, then the recipe is written through the output's stages,
# entered a second time (writing@2, done@2; the test hook's STAGE@N). Up to the version's creation
# nothing is left; from then on the search finishes first (version READY, alias, winner and search
# runs FINISHED) and stops before its recipe; a signal while the recipe is written leaves the
# registration complete and no recipe; once it is in place, both stand (docs/signals.md).
SEARCH_REGISTRATION_STAGES = {
    "checks": "nothing", "writing": "nothing", "logging": "nothing",
    "registering": "finished first", "tagging": "finished first", "done": "finished first",
    "writing@2": "registered", "final-move": "registered", "done@2": "both stand",
}
SEARCH_REGISTRATION_ROWS = (
    [("sqlite", stage, signal.SIGTERM) for stage in SEARCH_REGISTRATION_STAGES]
    + [("sqlite", stage, signum) for stage in ("registering", "done@2") for signum in (signal.SIGINT, signal.SIGHUP)]
    + [("postgresql", "registering", signal.SIGTERM)]
)


@pytest.mark.parametrize("backend, stage, signum", SEARCH_REGISTRATION_ROWS, indirect=["backend"],
                         ids=[f"{b}-{stage}-{s.name}" for b, stage, s in SEARCH_REGISTRATION_ROWS])
def test_a_signal_in_each_stage_of_a_search_that_registers_and_writes_its_recipe(tmp_path, forks, signal_inputs, backend, stage, signum):
    name = f"searched-{stage.replace('@', '-')}-{signum.name}".lower()
    (tmp_path / "out").mkdir()
    recipe_out = tmp_path / "out" / "best.yaml"
    inputs_before = {p.name: tree_digests(p) for p in signal_inputs.iterdir()}
    with backend.admin():
        runs_before = {r.info.run_id for r in backend.client.search_runs([backend.experiment_id])}
    args = ["search", signal_inputs / "search.yaml", "-q", "--register", name, "--alias", "champion", "--output-recipe", recipe_out]

    status, stdout, stderr = _signalled_in(forks, tmp_path, args, stage, backend.env, signum)

    assert status == 128 + signum, stderr
    line = one_error_line(stderr)
    outcome = SEARCH_REGISTRATION_STAGES[stage]
    with backend.admin():
        new_runs = [r for r in backend.client.search_runs([backend.experiment_id]) if r.info.run_id not in runs_before]
        roles = sorted((r.data.tags.get("taskvec.search.role"), r.info.status) for r in new_runs)
        versions = backend.client.search_model_versions(f"name = '{name}'")
        if outcome == "nothing":
            assert line == f"Error: interrupted by {signum.name}; {NOTHING}"
            assert versions == []
            # checks: no run yet; then the winner's run and the search's end FAILED, the candidate's stays FINISHED
            assert roles == ([] if stage == "checks" else [("candidate", "FINISHED"), ("search", "FAILED"), ("winner", "FAILED")])
        else:
            (version,) = versions
            complete = f"models:/{name}/1 is complete and its run {version.run_id} ended FINISHED"
            assert roles == [("candidate", "FINISHED"), ("search", "FINISHED"), ("winner", "FINISHED")]
            assert {r.info.run_id for r in new_runs if r.data.tags.get("taskvec.search.role") == "winner"} == {version.run_id}
            assert (str(version.version), version.status) == ("1", "READY")
            assert str(backend.client.get_model_version_by_alias(name, "champion").version) == "1"
            if outcome == "finished first":
                assert line == f"Error: interrupted by {signum.name}; it finished the registration first: {complete}"
            elif outcome == "registered":
                assert line == f"Error: interrupted by {signum.name}; {complete}"
            else:
                assert line == f"Error: interrupted by {signum.name}; {complete}; {recipe_out} was written whole before it and stands"
                (search_run,) = [r for r in new_runs if r.data.tags.get("taskvec.search.role") == "search"]
                logged = Path(backend.client.download_artifacts(search_run.info.run_id, "search/best_recipe.yaml", str(tmp_path / "logged")))
                assert recipe_out.read_text("utf-8") == logged.read_text("utf-8")  # the winning recipe, whole
                shutil.rmtree(tmp_path / "logged")
    assert recipe_out.exists() == (outcome == "both stand")
    assert stdout == "" and leftovers(recipe_out.parent) == []
    assert sorted(p.name for p in recipe_out.parent.iterdir()) == (["best.yaml"] if outcome == "both stand" else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command", "out", "release", "release.reached"]
    assert {p.name: tree_digests(p) for p in signal_inputs.iterdir()} == inputs_before


# leaderboard --register NAME --register-each: every method's search runs (their candidates mark no
# stage of the command), then each winner registers with compose --register's stages, then the alias
# `best` is set and the table logged. Up to the first version's creation nothing is registered; from
# then on the leaderboard finishes first (every winner READY, the alias set, every run FINISHED) and
# says what is complete (docs/signals.md).
LEADERBOARD_STAGES = {"writing": "nothing", "registering": "finished first", "done@2": "finished first"}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("stage", list(LEADERBOARD_STAGES))
def test_a_signal_in_a_leaderboards_registrations_has_its_one_outcome(tmp_path, forks, signal_inputs, backend, stage):
    name = f"ranked-{stage.replace('@', '-')}"
    inputs_before = {p.name: tree_digests(p) for p in signal_inputs.iterdir()}
    client = backend.client
    experiment = backend.experiment_id
    runs_before = {r.info.run_id for r in client.search_runs([experiment])}
    args = ["leaderboard", signal_inputs / "search.yaml", "--methods", "task_arithmetic,ties", "--trials", "2", "-q", "--register", name, "--register-each"]

    status, stdout, stderr = _signalled_in(forks, tmp_path, args, stage, backend.env, signal.SIGTERM)

    assert status == 128 + signal.SIGTERM, stderr
    line = one_error_line(stderr)
    new_runs = [r for r in client.search_runs([experiment]) if r.info.run_id not in runs_before]
    roles = sorted((r.data.tags["taskvec.leaderboard.role"], r.info.status) for r in new_runs if "taskvec.leaderboard.role" in r.data.tags)
    assert {r.info.status for r in new_runs if "taskvec.leaderboard.role" not in r.data.tags} == {"FINISHED"}  # the searches and their candidates
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if LEADERBOARD_STAGES[stage] == "nothing":
        assert line == f"Error: interrupted by SIGTERM; {NOTHING}"
        assert versions == []
        # the method run the winner was registering in was reopened for it, and ends FAILED with it
        assert roles == [("leaderboard", "FAILED"), ("method", "FAILED"), ("method", "FINISHED"), ("winner", "FAILED")]
    else:
        assert [(str(v.version), v.status) for v in versions] == [("1", "READY"), ("2", "READY")]
        assert str(client.get_model_version_by_alias(name, "best").version) in {"1", "2"}
        assert roles == [("leaderboard", "FINISHED"), *[("method", "FINISHED")] * 2, *[("winner", "FINISHED")] * 2]
        assert {v.run_id for v in versions} == {r.info.run_id for r in new_runs if r.data.tags.get("taskvec.leaderboard.role") == "winner"}
        complete = "; ".join(f"models:/{name}/{v.version} is complete and its run {v.run_id} ended FINISHED" for v in versions)
        assert line == f"Error: interrupted by SIGTERM; it finished the registration first: {complete}"
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command", "release", "release.reached"]
    assert {p.name: tree_digests(p) for p in signal_inputs.iterdir()} == inputs_before


# -- extract --register and compress --register: their vector is made first, then registered into the
# fine-tune's run with the same stages from the version's creation on as compose --register's.
VECTOR_REGISTRATIONS = {
    "extract": ["extract", "--base", "{base}", "--finetuned", "{finetuned}", "--register", "{name}", "--alias", "champion"],
    "compress": ["compress", "{vector}", "--format", "sparse", "--density", "0.5", "--register", "{name}", "--alias", "champion"],
}
VECTOR_REGISTRATION_STAGES = {"logging": "nothing", "registering": "finished first", "tagging": "finished first", "done": "complete"}


@pytest.mark.parametrize("backend, signum", [("sqlite", s) for s in SIGNALS] + [("postgresql", signal.SIGTERM)],
                         ids=[f"sqlite-{s.name}" for s in SIGNALS] + ["postgresql-SIGTERM"], indirect=["backend"])
@pytest.mark.parametrize("stage", list(VECTOR_REGISTRATION_STAGES))
@pytest.mark.parametrize("command", list(VECTOR_REGISTRATIONS))
def test_a_signal_in_each_stage_of_a_vector_registration_has_its_one_outcome(tmp_path, forks, backend, command, stage, signum):
    from mlflow_helpers import BASE_NAME, vector_name

    name = f"staged-{command}-{stage}-{signum.name}".lower()
    vector_ref = f"models:/{vector_name('rotate')}/1"
    with backend.admin():
        finetuned = backend.client.get_model_version(vector_name("rotate"), "1").tags["taskvec.finetuned_uri"]
        runs_before = {r.info.run_id: r.info.status for r in backend.client.search_runs([backend.experiment_id])}
    fills = {"{base}": f"models:/{BASE_NAME}/1", "{finetuned}": finetuned, "{vector}": vector_ref, "{name}": name}
    args = [fills.get(a, a) for a in VECTOR_REGISTRATIONS[command]]

    status, stdout, stderr = _signalled_in(forks, tmp_path, args, stage, backend.env, signum)

    assert status == 128 + signum, stderr
    line = one_error_line(stderr)
    with backend.admin():
        runs_after = {r.info.run_id: r.info.status for r in backend.client.search_runs([backend.experiment_id])}
        versions = backend.client.search_model_versions(f"name = '{name}'")
        assert runs_after == runs_before  # registered into the fine-tune's run, which keeps its status (FINISHED); no run of its own
        if VECTOR_REGISTRATION_STAGES[stage] == "nothing":
            assert line == f"Error: interrupted by {signum.name}; {NOTHING}"
            assert versions == []
        else:
            (version,) = versions
            first = "it finished the registration first: " if VECTOR_REGISTRATION_STAGES[stage] == "finished first" else ""
            assert line == f"Error: interrupted by {signum.name}; {first}models:/{name}/1 is complete and its run {version.run_id} ended FINISHED"
            assert (str(version.version), version.status, runs_after[version.run_id]) == ("1", "READY", "FINISHED")
            assert str(backend.client.get_model_version_by_alias(name, "champion").version) == "1"
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["command", "release", "release.reached"]


# -- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs), mounted for the test and unmounted after it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a 2 MB tmpfs to fill (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_output_larger_than_the_free_space_is_refused_before_writing_naming_the_space(tmp_path, small_disk):
    base, ft, recipe = write_inputs(tmp_path / "in", tensors=2, numel=1 << 19)  # a 4 MB output
    out = small_disk / "merged.safetensors"

    proc = subprocess.run(command("compose", recipe, "-o", out), env=env(), capture_output=True, text=True, timeout=120)

    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert f"{out}: not enough free space in {small_disk}: the output needs 4.3 MB, 2.1 MB are free; nothing was written" in line
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("output_name", ["merged.safetensors", "merged"])
def test_a_disk_that_fills_up_while_writing_is_reported_and_the_partial_removed(tmp_path, small_disk, output_name):
    base, ft, _ = write_inputs(tmp_path / "in", tensors=8, numel=1 << 15)  # a 1 MB output: it fits
    vector = TaskVector.extract(base, ft)
    out = small_disk / output_name
    ballast = small_disk / "someone-elses-download"

    def another_program_fills_the_disk(_name):
        if ballast.exists():
            return
        with open(ballast, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass

    with pytest.raises(TaskVecError) as info:
        merge_to(base, [vector], [1.0], output=out, progress=another_program_fills_the_disk)

    message = str(info.value)
    assert message.startswith(f"{out}: the disk of {small_disk} filled up while writing (the output needs 1.1 MB, ")
    assert message.endswith("; the partial output was removed")
    assert sorted(p.name for p in small_disk.iterdir()) == ["someone-elses-download"]  # and the disk is usable again


# -- recipes ----------------------------------------------------------------------------------------


def test_a_scale_in_exponent_notation_is_a_number(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: b.safetensors\nscale: 1e-3\nvectors:\n  - {vector: v.safetensors, weight: -2E+1}\n", "utf-8")

    spec = load_recipe(recipe)

    assert spec.scale == 0.001 and spec.vectors[0].weight == -20.0


def test_an_alias_bomb_is_refused_in_under_a_second(tmp_path):
    from test_bad_input import ALIAS_BOMB

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ALIAS_BOMB, "utf-8")

    started = time.perf_counter()
    with pytest.raises(TaskVecError, match="expands to more than 100000 values"):
        load_recipe(recipe)
    assert time.perf_counter() - started < 1.0


def test_allow_nonfinite_lets_an_overflowing_output_through(tmp_path):
    save_file({"w": torch.full((4,), 30000.0, dtype=torch.float16)}, str(tmp_path / "b.safetensors"))
    save_file({"w": torch.full((4,), 60000.0, dtype=torch.float16)}, str(tmp_path / "f.safetensors"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: b.safetensors\nscale: 2.0\nallow_nonfinite: true\nvectors: [{finetuned: f.safetensors}]\n", "utf-8")

    result = CliRunner().invoke(cli, ["compose", str(recipe), "-o", str(tmp_path / "out.safetensors")])

    assert result.exit_code == 0, result.output
    assert torch.isinf(load_file(str(tmp_path / "out.safetensors"))["w"]).all()


def test_extracting_a_zero_vector_warns_in_one_line_naming_the_files(tmp_path):
    base, _, _ = write_inputs(tmp_path / "in")
    copy = tmp_path / "in" / "copy.safetensors"
    copy.write_bytes(base.read_bytes())
    out = tmp_path / "zero.safetensors"

    result = CliRunner().invoke(cli, ["extract", "--base", str(base), "--finetuned", str(copy), "-o", str(out)])

    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"Warning: {out}: the task vector is all zeros: the fine-tune {copy} equals its base on every tensor it covers"]
    assert out.exists()


# -- a tracking server that does not answer ------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _registry_recipe(tmp_path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: models:/base/1\nvectors: [{vector: models:/rotate-vector/1}]\n", "utf-8")
    return recipe


def _without_mlflow_settings(**extra) -> dict:
    return {**{k: v for k, v in env().items() if not k.startswith("MLFLOW_")}, **extra}


def test_a_dead_tracking_server_fails_within_30_s_saying_once_that_it_retries(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"

    started = time.monotonic()
    proc = subprocess.run(
        command("compose", _registry_recipe(tmp_path), "--register", "edit"),
        env=_without_mlflow_settings(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    seconds = time.monotonic() - started

    assert proc.returncode == 1
    warning, error = proc.stderr.splitlines()
    assert warning == f"Warning: the tracking server {uri} does not answer; retrying for up to 11 s (MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT set how long)"
    assert error.startswith(f"Error: registering 'edit' failed: the tracking server at {uri} did not answer")
    assert seconds < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def _register_against_a_silent_server(tmp_path, **settings) -> tuple[subprocess.CompletedProcess, float, float, str, int]:
    """``compose --register`` against a server that accepts connections and never answers, with
    MLflow ``settings``; returns the process, its seconds in all (from before its start to its
    exit), its seconds from the server's first connection to its exit (the wait the silence
    causes), the server's URI and the connections it made (one per attempt)."""
    import socket
    import threading

    contacts: list[float] = []
    held = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(0.1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        finished = threading.Event()

        def accept_and_never_answer() -> None:
            while not finished.is_set():
                try:
                    held.append(silent.accept()[0])
                except TimeoutError:
                    continue
                contacts.append(time.monotonic())

        listener = threading.Thread(target=accept_and_never_answer, daemon=True)
        listener.start()
        started = time.monotonic()
        try:
            proc = subprocess.run(
                command("compose", _registry_recipe(tmp_path), "--register", "edit"),
                env=_without_mlflow_settings(MLFLOW_TRACKING_URI=uri, **settings), cwd=tmp_path, capture_output=True, text=True, timeout=120,
            )
            ended = time.monotonic()
        finally:
            finished.set()
            listener.join()
            for conn in held:
                conn.close()
        assert contacts, proc.stderr
        return proc, ended - started, ended - contacts[0], uri, len(contacts)


def test_a_server_that_accepts_connections_and_never_answers_fails_within_30_s(tmp_path):
    proc, seconds, waited, uri, attempts = _register_against_a_silent_server(tmp_path)

    assert proc.returncode == 1
    # docs/teams.md's bound, on the whole command: the interpreter's start-up and imports, one request
    # of at most 11 s (2 attempts of 5 s, up to 1 s between), then the error and the exit
    assert seconds < 30, f"it took {seconds:.1f} s in all, {waited:.1f} s of them from its first contact with the silent server: {proc.stderr}"
    assert waited < 20, f"it waited {waited:.1f} s for the silent server, more than its 11 s request and an exit"
    assert attempts == 2  # the request and its one retry; no request after it
    warning, error = proc.stderr.splitlines()
    assert warning.startswith(f"Warning: the tracking server {uri} does not answer; retrying for up to 11 s")
    assert error.startswith(f"Error: registering 'edit' failed: the tracking server at {uri} did not answer"), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_the_users_own_mlflow_retry_settings_are_respected(tmp_path):
    proc, seconds, waited, uri, attempts = _register_against_a_silent_server(tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="1")

    assert proc.returncode == 1
    line = one_error_line(proc.stderr)  # no retries, so no retry line
    assert line.startswith(f"Error: registering 'edit' failed: the tracking server at {uri} did not answer")
    assert "(read timeout=1)" in line  # the user's timeout, not the bounded 5 s
    assert attempts == 1, f"one attempt of 1 s, not the bounded retry; it waited {waited:.1f} s"


# -- a run its process could not end -------------------------------------------------------------


def test_a_run_left_running_by_a_process_that_died_is_ended_by_the_next_registration(tmp_path, tmp_path_factory, monkeypatch):
    from mlflow_helpers import mlflow_store, template_db

    from mlflow_taskvec.mlflow.runs import process_identity

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_identity = process_identity(gone.pid)  # read while it lives: its start time
    gone.wait()
    with mlflow_store(tmp_path / "store", template_db(tmp_path_factory)) as store:
        orphan = store.client.create_run(store.experiment_id, tags={"taskvec.process": gone_identity})
        alive = store.client.create_run(store.experiment_id, tags={"taskvec.process": process_identity()})
        elsewhere = store.client.create_run(store.experiment_id, tags={"taskvec.process": f"another-host:{gone.pid}:1"})
        small = tmp_path / "small"
        small.mkdir()
        save_file({"w": torch.ones(4)}, str(small / "model.safetensors"))
        (small / "config.json").write_text("{}", "utf-8")
        save_file({"w": torch.ones(4) * 2}, str(tmp_path / "ft.safetensors"))
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("base: small\nvectors: [{finetuned: ft.safetensors}]\n", "utf-8")
        monkeypatch.chdir(tmp_path)

        result = CliRunner().invoke(cli, ["compose", str(recipe), "--register", "edit"])

        assert result.exit_code == 0, result.output
        status = {r.info.run_id: r.info.status for r in store.client.search_runs([store.experiment_id])}
        assert status[orphan.info.run_id] == "FAILED"
        assert status[alive.info.run_id] == status[elsewhere.info.run_id] == "RUNNING"  # cannot tell: left alone
        stale, local = result.stderr.splitlines()
        assert stale == f"Warning: run {orphan.info.run_id} was left RUNNING by process {gone.pid}, which has ended; it is now FAILED"
        # and, the recipe naming local files, the version's reproducibility warning
        assert local.startswith("Warning: models:/edit/") and " names local paths (" in local
        assert local.endswith("register the inputs and use their models:/ URIs to make it reproducible")


def _killed_fine_tune_run(store) -> tuple[str, str]:
    """A base checkpoint and a fine-tune logged in a run that ended KILLED; (the base's and the fine-tune's models:/ URIs)."""
    import mlflow
    from mlflow_helpers import finetune_of, log_checkpoint, tiny_net

    with mlflow.start_run(run_name="pretrain"):
        base = log_checkpoint(tiny_net(0), "base")
    with mlflow.start_run(run_name="finetune") as run:
        finetuned = log_checkpoint(finetune_of(tiny_net(0), 1), "finetuned")
    store.client.set_terminated(run.info.run_id, "KILLED")
    return base.model_uri, finetuned.model_uri


def test_a_resumed_run_gets_its_status_back_when_the_registration_ends(tmp_path, tmp_path_factory):
    from mlflow_helpers import mlflow_store, template_db

    with mlflow_store(tmp_path / "store", template_db(tmp_path_factory)) as store:
        base, finetuned = _killed_fine_tune_run(store)
        run_id = store.client.get_logged_model(finetuned.split("/")[-1]).source_run_id

        result = CliRunner().invoke(cli, ["extract", "--base", base, "--finetuned", finetuned, "--register", "edit-vector", "-q"])

        assert result.exit_code == 0, result.output
        (version,) = store.client.search_model_versions("name='edit-vector'")
        assert version.run_id == run_id  # registered into the fine-tune's own run, which was resumed
        run = store.client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert "taskvec.status_before" not in run.data.tags
        assert {m.name for m in store.client.search_logged_models([store.experiment_id]) if m.source_run_id == run_id} == {"finetuned", "task_vector"}


def test_a_resumed_run_whose_process_died_gets_its_status_back_from_the_next_command(tmp_path, tmp_path_factory):
    from mlflow_helpers import mlflow_store, template_db

    from mlflow_taskvec.mlflow.runs import owned_run

    with mlflow_store(tmp_path / "store", template_db(tmp_path_factory)) as store:
        done = store.client.create_run(store.experiment_id)
        store.client.set_terminated(done.info.run_id, "KILLED")
        # a process resumes the run and dies inside, before it could end it
        code = (
            "import os, sys\nfrom mlflow_taskvec.mlflow.runs import owned_run\n"
            "with owned_run(sys.argv[1]):\n    os._exit(0)\n"
        )
        dead = subprocess.run([sys.executable, "-c", code, done.info.run_id], env=store.env(), capture_output=True, text=True, timeout=300)
        assert dead.returncode == 0, dead.stderr
        left = store.client.get_run(done.info.run_id)
        assert left.info.status == "RUNNING" and left.data.tags["taskvec.status_before"] == "KILLED"

        with pytest.warns(Warning) as warned, owned_run(None):
            pass

        assert store.client.get_run(done.info.run_id).info.status == "KILLED"
        (line,) = [str(w.message) for w in warned if "left RUNNING" in str(w.message)]
        assert line == f"run {done.info.run_id} was left RUNNING by process {left.data.tags['taskvec.process'].split(':')[1]}, which has ended; it is now KILLED"


# -- the final move, with the kernel's renameat2 and with the portable fallbacks ------------------


@pytest.fixture(params=["renameat2", "portable"])
def moves(request, monkeypatch):
    from mlflow_taskvec.engine import output

    if request.param == "portable":
        monkeypatch.setattr(output, "_RENAMEAT2", None)
    elif output._RENAMEAT2 is None:
        skip_or_fail("this C library has no renameat2")
    return output


def test_a_move_without_replacing_refuses_whatever_is_at_the_target(tmp_path, moves):
    for target_kind in ("file", "folder", "empty folder"):
        src, dst = tmp_path / f"src-{target_kind}", tmp_path / f"dst-{target_kind}"
        src.mkdir()
        (src / "new").write_text("new", "utf-8")
        if target_kind == "file":
            dst.write_text("precious", "utf-8")
        else:
            dst.mkdir()
            if target_kind == "folder":
                (dst / "important.txt").write_text("precious", "utf-8")
        with pytest.raises(FileExistsError):
            moves.rename_no_replace(src, dst)
        assert (src / "new").exists()
    moves.rename_no_replace(src, tmp_path / "free")
    assert (tmp_path / "free" / "new").read_text("utf-8") == "new" and not src.exists()


def test_an_exchange_swaps_a_file_and_a_folder(tmp_path, moves):
    (tmp_path / "a").write_text("a file", "utf-8")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inside").write_text("in b", "utf-8")

    moves.exchange(tmp_path / "a", tmp_path / "b")

    assert (tmp_path / "a" / "inside").read_text("utf-8") == "in b"
    assert (tmp_path / "b").read_text("utf-8") == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
