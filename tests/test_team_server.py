"""mlflow-taskvec against a team server: ``mlflow server --app-name basic-auth`` on PostgreSQL.

The session's ``team_server`` fixture (tests/team_server.py) is real: a fresh
PostgreSQL database, the basic-auth app with ``default_permission = READ`` and
artifacts proxied by the server. This module registers, as the admin and through
the package API, a checkpoint-kind base ``team-base`` and two task vectors; then
three users run the real CLI, each command its own process (forked from one that imported the
CLI, tests/forked_cli.py):

- alice has no grants, so READ on everything;
- bob has EDIT on the experiment and on the registered model ``team-composite``;
- carol has EDIT on the experiment but only READ on ``team-composite``.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from forked_cli import CommandForks, Forked
from mlflow.tracking import MlflowClient
from mlflow_helpers import TASKVEC_COMPOSITE_TAGS, count_hashing, finetune_of, log_checkpoint, signature_for, tiny_net
from team_server import ADMIN_USER, CuttingProxy, skip_or_fail, start_server

from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.registry import register_task_vector

# about 225 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(225)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "taskvec-team"
BASE = "team-base"
COMPOSITE = "team-composite"
TASKS = ("rotate", "flip")
CHROMIUM = "/usr/bin/chromium"


def vector(task: str) -> str:
    return f"team-{task}-vector"


class Team:
    """What the module fixture made on the server."""

    def __init__(self, server, experiment_id: str, root: Path, forks: CommandForks):
        self.server, self.forks = server, forks
        self.experiment_id = experiment_id
        self.root = root
        self.finetune_models: dict[str, str] = {}
        self.finetune_runs: dict[str, str] = {}

    def admin(self) -> MlflowClient:
        """A client as the admin (the ``team`` fixture keeps this process logged in as the admin)."""
        return MlflowClient(tracking_uri=self.server.url)

    def start_cli(self, user: str, *args, cache: Path | None = None) -> Forked:
        """Start ``mlflow-taskvec ARGS`` as a real process, as ``user``, in this module's experiment."""
        env = self.server.env(user, MLFLOW_EXPERIMENT_ID=self.experiment_id, MLFLOW_TASKVEC_CACHE=str(cache or self.root / f"cache-{user}"))
        return self.forks.start(args, env, self.root)

    def cli(self, user: str, *args, cache: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return finish(self.start_cli(user, *args, cache=cache), timeout)

    def recipe(self, name: str = "recipe.yaml", scale: float = 0.7, **extra) -> Path:
        path = self.root / name
        data = {
            "base": f"models:/{BASE}/1",
            "method": "task_arithmetic",
            "scale": scale,
            "vectors": [
                {"vector": f"models:/{vector('rotate')}/1", "weight": 1.0},
                {"vector": f"models:/{vector('flip')}/1", "weight": -0.5},
            ],
            **extra,
        }
        path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
        return path

    def runs(self) -> list:
        return self.admin().search_runs([self.experiment_id], max_results=1000)


def finish(command: Forked, timeout: float = 180) -> subprocess.CompletedProcess:
    return command.completed(timeout)


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    server = CommandForks(tmp_path_factory.mktemp("commands"))
    yield server
    server.close()


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``Error: ...`` line a refused command prints (and nothing else on stderr)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture(scope="module")
def team(team_server, forks, tmp_path_factory):
    """The module's experiment, base, fine-tunes, vectors and users; this process stays the admin."""
    root = tmp_path_factory.mktemp("team")
    with team_server.as_user(ADMIN_USER):
        client = MlflowClient()
        experiment_id = client.create_experiment(EXPERIMENT)
        made = Team(team_server, experiment_id, root, forks)
        with team_server.as_user(ADMIN_USER, MLFLOW_EXPERIMENT_ID=experiment_id, MLFLOW_TASKVEC_CACHE=str(root / "cache-admin")):
            base_net = tiny_net(0)
            with mlflow.start_run(run_name="pretrain"):
                log_checkpoint(base_net, "base", registered_model_name=BASE, signature=signature_for(base_net))
            base_ref = resolve(f"models:/{BASE}/1")
            for i, task in enumerate(TASKS):
                with mlflow.start_run(run_name=f"finetune-{task}") as run:
                    info = log_checkpoint(finetune_of(base_net, seed=100 + i), "finetuned")
                made.finetune_models[task] = info.model_uri
                made.finetune_runs[task] = run.info.run_id
                ft_ref = resolve(info.model_uri)
                tv = TaskVector.extract(base_ref.path, ft_ref.path, task=task)
                register_task_vector(tv, vector(task), base_ref, ft_ref)
            client.create_registered_model(COMPOSITE)
        for user in ("alice", "bob", "carol"):
            team_server.create_user(user)
        team_server.grant("bob", "experiment", experiment_id, "EDIT")
        team_server.grant("bob", "registered_model", COMPOSITE, "EDIT")
        team_server.grant("carol", "experiment", experiment_id, "EDIT")
        yield made


@pytest.fixture(scope="module")
def bobs_composite(team) -> dict:
    """``team-composite`` version registered by bob through the CLI: the process and the version."""
    proc = team.cli("bob", "compose", team.recipe(), "--register", COMPOSITE)
    assert proc.returncode == 0, proc.stderr
    versions = team.admin().search_model_versions(f"name='{COMPOSITE}'")
    assert len(versions) == 1
    return {"proc": proc, "version": versions[0]}


# -- permissions ------------------------------------------------------------------------


def test_reader_cannot_register_a_composite_because_it_may_not_create_runs(team):
    runs_before = len(team.runs())

    proc = team.cli("alice", "compose", team.recipe(), "--register", "alice-composite")

    line = one_error_line(proc)
    assert line == (
        "Error: permission denied by the tracking server: user 'alice' may not create runs in experiment "
        f"'{team.experiment_id}' (HTTP 403)"
    )
    assert team.admin().search_registered_models("name='alice-composite'") == []
    assert len(team.runs()) == runs_before


def test_reader_cannot_register_a_task_vector_and_the_finetune_run_is_untouched(team):
    client = team.admin()
    run_before = client.get_run(team.finetune_runs["rotate"])

    proc = team.cli(
        "alice", "extract", "--base", f"models:/{BASE}/1", "--finetuned", team.finetune_models["rotate"],
        "--task", "rotate", "--register", vector("rotate"),
    )  # fmt: skip

    assert one_error_line(proc) == (
        f"Error: permission denied by the tracking server: user 'alice' may not register versions of model '{vector('rotate')}' "
        "(its permission on the model is READ)"
    )
    assert [v.version for v in client.search_model_versions(f"name='{vector('rotate')}'")] == ["1"]
    run_after = client.get_run(run_before.info.run_id)
    assert (run_after.info.status, run_after.info.end_time) == ("FINISHED", run_before.info.end_time)


def test_editor_of_the_experiment_without_edit_on_the_model_is_refused_before_any_run(team):
    runs_before = len(team.runs())

    proc = team.cli("carol", "compose", team.recipe(), "--register", COMPOSITE)

    assert "user 'carol' may not register versions of model 'team-composite'" in one_error_line(proc)
    assert len(team.runs()) == runs_before
    assert all(v.user_id != "carol" for v in team.admin().search_model_versions(f"name='{COMPOSITE}'"))


def test_editor_registers_a_composite_with_its_lineage(team, bobs_composite, monkeypatch):
    mv = bobs_composite["version"]
    proc = bobs_composite["proc"]

    assert f"registered: models:/{COMPOSITE}/{mv.version}" in proc.stdout
    assert mv.status == "READY"
    assert TASKVEC_COMPOSITE_TAGS <= set(mv.tags)
    assert mv.tags["taskvec.method"] == "task_arithmetic"
    assert mv.tags["taskvec.scale"] == "0.7"
    inputs = json.loads(mv.tags["taskvec.inputs"])
    assert [(i["uri"], i["weight"]) for i in inputs] == [(f"models:/{vector('rotate')}/1", 1.0), (f"models:/{vector('flip')}/1", -0.5)]
    run = team.admin().get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.user_id == "bob"
    # What the server stores is what was registered: downloaded through the server's proxy and
    # checked against the tag, hashed as the HTTP download wrote it and not in a pass after
    after, during = count_hashing(monkeypatch)
    with team.server.as_user(ADMIN_USER, MLFLOW_TASKVEC_CACHE=str(team.root / "cache-check")):
        got = resolve(f"models:/{COMPOSITE}/{mv.version}")
    assert (sum(during), sum(after)) == (open_checkpoint(got.path).stored_bytes, 0)
    assert got.fingerprint == mv.tags["taskvec.fingerprint"] == open_checkpoint(got.path).fingerprint(fresh=True)


def test_editor_of_a_vector_model_registers_a_task_vector_in_the_finetune_run(team):
    team.server.grant("bob", "registered_model", vector("flip"), "EDIT")

    proc = team.cli(
        "bob", "extract", "--base", f"models:/{BASE}/1", "--finetuned", team.finetune_models["flip"],
        "--task", "flip", "--register", vector("flip"),
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    mv = team.admin().get_model_version(vector("flip"), "2")
    assert mv.tags["taskvec.kind"] == "task_vector"
    assert mv.tags["taskvec.finetuned_uri"] == team.finetune_models["flip"]
    assert mv.run_id == team.finetune_runs["flip"]
    assert team.admin().get_model_version(vector("flip"), "1").tags["taskvec.fingerprint"] == mv.tags["taskvec.fingerprint"]


def test_a_registration_that_fails_inside_its_run_ends_the_run_failed_and_registers_nothing(team):
    # The evaluator is looked up only once the composite is logged, inside the run.
    recipe = team.recipe("bad-evaluator.yaml", evaluation={"evaluator": "digits_tasks:no_such_function", "tasks": ["digits"]})
    runs_before = {r.info.run_id for r in team.runs()}
    versions_before = len(team.admin().search_model_versions(f"name='{COMPOSITE}'"))

    proc = team.cli("bob", "compose", recipe, "--register", COMPOSITE)

    assert "evaluator 'digits_tasks:no_such_function' cannot be imported" in one_error_line(proc)
    new_runs = [r for r in team.runs() if r.info.run_id not in runs_before]
    assert [(r.info.status, r.info.user_id) for r in new_runs] == [("FAILED", "bob")]
    assert len(team.admin().search_model_versions(f"name='{COMPOSITE}'")) == versions_before


# -- concurrency ------------------------------------------------------------------------


def test_concurrent_creates_of_one_registered_model_all_succeed(team):
    from mlflow_taskvec.mlflow.registry import _ensure_registered_model

    start, errors = threading.Barrier(8), []

    def ensure():
        start.wait()
        try:
            _ensure_registered_model(MlflowClient(), "team-raced")
        except Exception as exc:  # collected: the assertion below shows them all
            errors.append(exc)

    threads = [threading.Thread(target=ensure) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert [t.name for t in threads if t.is_alive()] == []  # none still waiting on the server
    assert errors == []
    assert team.admin().get_registered_model("team-raced").name == "team-raced"


def test_eight_concurrent_registrations_give_eight_complete_versions(team):
    name = "team-concurrent"
    recipe = team.recipe("concurrent.yaml")
    cache = team.root / "cache-concurrent"  # one cache shared by all, as parallel jobs on one machine
    started = time.monotonic()

    procs = [team.start_cli("bob", "compose", recipe, "--register", name, cache=cache) for _ in range(8)]
    done = [finish(p, timeout=300) for p in procs]

    seconds = time.monotonic() - started
    assert [p.returncode for p in done] == [0] * 8, [p.stderr for p in done if p.returncode]
    client = team.admin()
    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, 9))
    assert {v.status for v in versions} == {"READY"}
    printed = sorted(line.split()[1] for p in done for line in p.stdout.splitlines() if line.startswith("registered: "))
    assert printed == sorted(f"models:/{name}/{v.version}" for v in versions)
    assert len({v.run_id for v in versions}) == 8
    assert len({v.source for v in versions}) == 8
    for v in versions:
        assert TASKVEC_COMPOSITE_TAGS <= set(v.tags), v.version
        assert client.get_run(v.run_id).info.status == "FINISHED"
    # Same recipe, same inputs: the same content, eight times.
    assert len({v.tags["taskvec.fingerprint"] for v in versions}) == 1
    assert len({v.tags["taskvec.recipe_sha256"] for v in versions}) == 1
    print(f"8 concurrent compose --register: {seconds:.1f} s")


# -- artifacts are checked against their fingerprints ------------------------------------


def register_rotate_vector(team, name: str):
    """A fresh version of ``name``: the rotate task vector, registered by the admin in a new run."""
    base_ref = resolve(f"models:/{BASE}/1")
    ft_ref = resolve(team.finetune_models["rotate"])
    tv = TaskVector.extract(base_ref.path, ft_ref.path, task="rotate")
    with mlflow.start_run(experiment_id=team.experiment_id) as run:
        reg = register_task_vector(tv, name, base_ref, ft_ref, run_id=run.info.run_id)
    return team.admin().get_model_version(name, reg.version), reg


def weights_file(team, model_id: str) -> Path:
    found = sorted((team.server.artifacts / team.experiment_id / "models" / model_id).rglob("*.safetensors"))
    assert len(found) == 1, found
    return found[0]


def test_downloaded_weights_that_do_not_match_the_fingerprint_are_refused(team):
    mv, reg = register_rotate_vector(team, "team-tamper-weights")
    weights = weights_file(team, reg.model_id)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor value, on the server's disk
    weights.write_bytes(bytes(data))

    proc = team.cli("alice", "inspect", f"models:/team-tamper-weights/{mv.version}", cache=team.root / "cache-tamper")

    line = one_error_line(proc)
    assert line.startswith(f"Error: models:/team-tamper-weights/{mv.version}: downloaded weights have fingerprint ")
    assert line.endswith(f", the model records {mv.tags['taskvec.fingerprint'][:16]} (tampered or incomplete artifact)")
    assert not list((team.root / "cache-tamper").glob("fp-*"))  # nothing tampered was cached


def test_weights_and_mlmodel_rewritten_together_are_refused_by_the_registry_tag(team, tmp_path):
    from safetensors.torch import load_file, save_file

    from mlflow_taskvec.errors import TaskVecError

    mv, reg = register_rotate_vector(team, "team-tamper-both")
    weights = weights_file(team, reg.model_id)
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = state[first] + 1.0
    save_file(state, str(weights))
    forged = open_checkpoint(weights).fingerprint(fresh=True)
    mlmodel = weights.parents[1] / "MLmodel" if (weights.parents[1] / "MLmodel").is_file() else weights.parent / "MLmodel"
    text = mlmodel.read_text("utf-8")
    assert mv.tags["taskvec.fingerprint"] in text
    mlmodel.write_text(text.replace(mv.tags["taskvec.fingerprint"], forged), "utf-8")

    with team.server.as_user(ADMIN_USER, MLFLOW_TASKVEC_CACHE=str(tmp_path / "cache")):
        with pytest.raises(TaskVecError) as err:
            resolve(f"models:/team-tamper-both/{mv.version}")
    assert str(err.value) == (
        f"models:/team-tamper-both/{mv.version}: the MLmodel file records fingerprint {forged[:16]}, "
        f"the registered version {mv.tags['taskvec.fingerprint'][:16]} (tampered artifact)"
    )


# -- a server that dies in the middle of an upload ----------------------------------------


def test_server_killed_mid_upload_fails_clearly_leaves_no_version_and_a_rerun_succeeds(tmp_path, hf_dir, forks):
    import torch

    g = torch.Generator().manual_seed(0)
    base = {"encoder.weight": torch.randn(512, 512, generator=g), "head.weight": torch.randn(10, 512, generator=g)}
    hf_dir(tmp_path / "base", base)
    hf_dir(tmp_path / "ft", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": "./base", "scale": 0.5, "vectors": [{"finetuned": "./ft"}]}), "utf-8")
    name = "fault-composite"

    server = start_server(tmp_path / "server", auth=False)
    # The composite's weights are 1 MiB: kill the server once 256 KiB of their upload went through.
    proxy = CuttingProxy(server.port, marker=b"model.safetensors", after_bytes=256 * 1024, on_cut=server.kill)
    try:
        env = server.env(MLFLOW_TRACKING_URI=proxy.url, MLFLOW_TASKVEC_CACHE=str(tmp_path / "cache"))
        failed = finish(forks.start(["compose", recipe, "--register", name], env, tmp_path))

        assert proxy.cut.is_set()
        retries = [line for line in failed.stderr.splitlines() if line.startswith("Warning: the tracking server")]
        assert len(retries) <= 1  # the one line said while retrying
        line = one_error_line(subprocess.CompletedProcess(failed.args, failed.returncode, failed.stdout, "\n".join(
            line for line in failed.stderr.splitlines() if line not in retries)))
        assert line.startswith(f"Error: registering '{name}' failed: the tracking server at {proxy.url} did not answer or dropped the connection")
        server.start()  # the same database, artifact folder and port
        client = MlflowClient(tracking_uri=server.url)
        assert client.search_model_versions(f"name='{name}'") == []
        assert [r.info.status for r in client.search_runs(["0"]) if r.info.status == "FINISHED"] == []

        rerun = finish(forks.start(["compose", recipe, "--register", name], env, tmp_path))

        assert rerun.returncode == 0, rerun.stderr
        (mv,) = client.search_model_versions(f"name='{name}'")
        assert (mv.version, mv.status) == ("1", "READY")
        assert client.get_run(mv.run_id).info.status == "FINISHED"
        # the first attempt's run, left RUNNING by the dead server, was ended by the rerun
        assert sorted(r.info.status for r in client.search_runs(["0"])) == ["FAILED", "FINISHED"]
        assert "was left RUNNING by process" in rerun.stderr
        with server.as_user(ADMIN_USER, MLFLOW_TASKVEC_CACHE=str(tmp_path / "cache-check")):
            assert resolve(f"models:/{name}/1").fingerprint == mv.tags["taskvec.fingerprint"]
    finally:
        proxy.close()
        server.close()


# -- governance on the team server ------------------------------------------------------


def test_approve_lineage_verify_and_the_policy_work_against_the_team_server(team, bobs_composite):
    composite = f"models:/{COMPOSITE}/{bobs_composite['version'].version}"
    rotate, flip = f"models:/{vector('rotate')}/1", f"models:/{vector('flip')}/1"

    refused = team.cli("alice", "approve", rotate, "--alias", "approved")  # READ only: may not set aliases
    assert "permission denied by the tracking server: user 'alice' may not" in one_error_line(refused)
    assert team.admin().get_model_version(vector("rotate"), "1").aliases == []

    approved = team.cli(ADMIN_USER, "approve", rotate, "--alias", "approved", "--note", "team review")
    assert approved.returncode == 0, approved.stderr
    at = team.admin().get_model_version(vector("rotate"), "1").tags["taskvec.approval.approved.at"]
    assert approved.stdout.strip() == f"approved: {rotate} as 'approved' by {ADMIN_USER} at {at} (team review)"

    lineage = team.cli("alice", "lineage", composite)  # READ is enough to read what a version is made of
    assert lineage.returncode == 0, lineage.stderr
    rotate_line = next(line for line in lineage.stdout.splitlines() if f"input: {rotate}" in line)
    assert rotate_line.endswith(f"@approved  approved by {ADMIN_USER} at {at}")

    verified = team.cli("alice", "verify", composite, "--recursive", "-q")
    assert verified.returncode == 0, verified.stderr
    assert [line.split(" (")[0] for line in verified.stdout.splitlines()] == [f"verified: {composite}", f"verified: {rotate}", f"verified: {flip}"]

    versions_before = len(team.admin().search_model_versions(f"name='{COMPOSITE}'"))
    policy = team.cli("bob", "compose", team.recipe("policy.yaml"), "--register", COMPOSITE, "--require-alias", "approved")
    assert f"vectors[1] ({flip}): version 1 of '{vector('flip')}' does not carry the alias 'approved'" in one_error_line(policy)
    assert len(team.admin().search_model_versions(f"name='{COMPOSITE}'")) == versions_before


# -- the registry UI ---------------------------------------------------------------------


def test_registry_ui_shows_the_lineage_of_a_composite(team, bobs_composite, tmp_path):
    if not Path(CHROMIUM).is_file():
        skip_or_fail(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    mv = bobs_composite["version"]
    url = f"{team.server.url}/#/models/{COMPOSITE}/versions/{mv.version}"
    shot = tmp_path / "registry-ui.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            # alice may only read: a reviewer's view.
            context = browser.new_context(
                http_credentials={"username": "alice", "password": team.server.passwords["alice"]},
                viewport={"width": 1400, "height": 1800},
            )
            page = context.new_page()
            page.goto(url)
            page.get_by_text("taskvec.fingerprint").first.wait_for(timeout=60_000)
            page.get_by_text(vector("flip")).first.wait_for(timeout=30_000)
            body = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    kept = ROOT / "test-artifacts" / "registry-ui.png"
    kept.parent.mkdir(exist_ok=True)
    kept.write_bytes(shot.read_bytes())

    for key in ("taskvec.method", "taskvec.scale", "taskvec.inputs", "taskvec.fingerprint"):
        assert key in body
    assert mv.tags["taskvec.fingerprint"] in body
    assert "task_arithmetic" in body
    # The description's lineage table: roles, input models and their weights.
    for cell in ("base", "task vector", BASE, vector("rotate"), vector("flip"), "-0.5"):
        assert cell in body
    assert shot.stat().st_size > 10_000
