"""The catalogue of bad input: one row per case, one test that runs them all.

Each case is the real ``mlflow-taskvec`` command (in-process through click's
CliRunner; the rows marked ``process`` as a real subprocess) against real files
and a real MLflow sqlite store. Every case must end the same way:

- a non-zero exit (1 for bad input, 2 for bad usage);
- exactly one line on stderr, ``Error: ...``, containing the expected fragment
  (and no traceback), and nothing on stdout;
- nothing registered or changed in the registry (every version, its tags and
  aliases are the same afterwards), no new run;
- nothing written: the case's working folder (where outputs would go) holds only
  what the case put there, and no temporary leftovers.

To add a case, add a row to CASES. Placeholders in ``args`` and ``recipe``:
``{local}`` the folder of local checkpoints below, ``{work}`` the case's working
folder (the current directory), ``{recipe}`` the case's recipe file,
``{rotate_run}`` / ``{rotate_model}`` the rotate fine-tune's run and logged model ids,
``{base_fp}`` / ``{other_base_fp}`` the first 16 hex digits of the local bases' fingerprints.
``SHOW_MESSAGES=1 pytest tests/test_bad_input.py -s`` prints every case's message.

Local checkpoints (``{local}``): ``base``, ``ft`` (a fine-tune of base), ``ft.tv``
(its task vector), ``other.tv`` (a task vector of another base), ``nan`` (a
fine-tune with a NaN), ``truncated.tv`` (a task vector cut in half), ``norms.tv``
(a vector of 1-D tensors only); all ``.safetensors``; and PEFT adapter folders
``lora`` (good) and ``lora-*`` (each wrong in one way, see ``_local_adapters``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow_helpers import (
    BASE_NAME,
    build_registry,
    flip_last_byte,
    mlflow_store,
    stored_weights,
    template_db,
    vector_name,
)
from safetensors.torch import save_file
from small_models import base_state, finetune_state

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.recipe import parse_recipe
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.registry import register_composite, register_task_vector

ROTATE = f"models:/{vector_name('rotate')}/1"
FLIP = f"models:/{vector_name('flip')}/1"
BASE = f"models:/{BASE_NAME}/1"


def local_recipe(*vectors: dict, **fields) -> dict:
    return {"base": "{local}/base.safetensors", "vectors": list(vectors) or [{"vector": "{local}/ft.tv.safetensors"}], **fields}


def registry_recipe(*vectors: dict, **fields) -> dict:
    return {"base": BASE, "scale": 0.5, "vectors": list(vectors) or [{"vector": ROTATE}], **fields}


def _tampered_vector(world) -> None:
    """A vector version whose stored weights had a byte changed. Its content (the encoder
    only) is its own: no cached download of the same content can stand in for it."""
    base_ref = resolve(BASE)
    ft_ref = resolve(f"models:/{world.registry.finetunes['rotate'].model_id}")
    vector = TaskVector.extract(base_ref.path, ft_ref.path, include=["encoder.*"], task="rotate")
    reg = register_task_vector(vector, "bad-tampered-vector", base_ref, ft_ref)
    flip_last_byte(stored_weights(world.client, reg.model_id))


def _garbled_composite(world) -> None:
    """A composite version whose taskvec.inputs tag was overwritten with something that is not a list of inputs."""
    reg = register_composite(parse_recipe(registry_recipe()), "bad-garbled")
    world.client.set_model_version_tag("bad-garbled", reg.version, "taskvec.inputs", '{"uri": "models:/x/1"}')


@dataclass
class Case:
    id: str
    args: list[str]
    expected: str
    recipe: dict | str | None = None  # written to {recipe} (a dict as YAML, a str as it is)
    setup: Callable | None = None  # setup(world), before the registry is snapshotted
    exit_code: int = 1
    process: bool = False  # run as a real subprocess
    env: dict = field(default_factory=dict)


COMPOSE = ["compose", "{recipe}", "-o", "out/merged"]
REGISTER = ["compose", "{recipe}", "--register", "bad-composite", "-o", "out/merged"]

CASES = [
    # -- recipes -----------------------------------------------------------------------------
    Case("recipe-missing", ["compose", "nope.yaml", "-o", "out/merged"], "nope.yaml: no such recipe file"),
    Case("recipe-not-yaml", COMPOSE, "recipe.yaml: not valid YAML at line 3", recipe="base: ok\nvectors: [unclosed\n"),
    Case("recipe-not-a-mapping", COMPOSE, "recipe.yaml: a recipe must be a mapping of fields, got list", recipe="- a\n- b\n"),
    Case("recipe-unknown-field", COMPOSE, "recipe.yaml: colour: unknown field", recipe=local_recipe(colour="red"), process=True),
    Case("recipe-missing-base", COMPOSE, "recipe.yaml: base: required field is missing", recipe={"vectors": [{"vector": "{local}/ft.tv.safetensors"}]}),
    Case("recipe-empty-vectors", COMPOSE, "recipe.yaml: vectors: the list is empty", recipe={"base": "{local}/base.safetensors", "vectors": []}),
    Case("recipe-weight-not-a-number", COMPOSE, "vectors[0].weight: 'abc' is not a number", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "weight": "abc"})),
    Case("recipe-unknown-method", COMPOSE, "method: unknown merge method 'tiez'", recipe=local_recipe(method="tiez")),
    Case("recipe-density-above-one", COMPOSE, "params.density: 1.5 ", recipe=local_recipe(method="ties", params={"density": 1.5})),
    Case("recipe-vector-and-finetuned", COMPOSE, "vectors[0]: give exactly one of 'vector' or 'finetuned'", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "finetuned": "{local}/ft.safetensors"})),
    Case("recipe-bad-dtype", COMPOSE, "recipe.yaml: dtype: 'int8' is not one of float32, float16, bfloat16, float64", recipe=local_recipe(dtype="int8")),
    Case("recipe-policy-unknown-field", COMPOSE, "recipe.yaml: policy.require: unknown field", recipe=local_recipe(policy={"require": "approved"})),
    Case("recipe-policy-empty-alias", COMPOSE, "recipe.yaml: policy.require_alias: an alias name cannot be empty", recipe=local_recipe(policy={"require_alias": " "})),
    Case("recipe-no-output", ["compose", "{recipe}"], "no output: set 'output' in the recipe or pass --output", recipe=local_recipe()),
    Case("compose-bad-max-shard-size", [*COMPOSE, "--max-shard-size", "12XB"], "--max-shard-size: '12XB' is not a size", recipe=local_recipe()),
    # -- references --------------------------------------------------------------------------
    Case("local-vector-missing", COMPOSE, "missing.safetensors: no such file or directory", recipe=local_recipe({"vector": "{local}/missing.safetensors"})),
    Case("unsupported-scheme", COMPOSE, "gs://bucket/v: unsupported reference scheme 'gs'", recipe=local_recipe({"vector": "gs://bucket/v"})),
    Case("unknown-registered-model", REGISTER, "vectors[0]: models:/no-such-model/1: Model Version (name=no-such-model, version=1) not found", recipe=registry_recipe({"vector": "models:/no-such-model/1"})),
    Case("unknown-alias", REGISTER, f"vectors[0]: models:/{vector_name('rotate')}@nope: Registered model alias nope not found", recipe=registry_recipe({"vector": f"models:/{vector_name('rotate')}@nope"})),
    Case("unknown-run", REGISTER, "runs:/0123456789abcdef0123456789abcdef/task_vector: Run with id=0123456789abcdef0123456789abcdef not found", recipe=registry_recipe({"vector": "runs:/0123456789abcdef0123456789abcdef/task_vector"})),
    Case("malformed-models-uri", REGISTER, "models:/justaname: not a models:/ reference", recipe=registry_recipe({"vector": "models:/justaname"})),
    Case("checkpoint-given-as-vector", REGISTER, f"vectors[0]: {BASE} is a checkpoint model, not a task vector", recipe=registry_recipe({"vector": BASE})),
    Case("extract-register-missing-base", ["extract", "--base", "models:/no-such-base/1", "--finetuned", "models:/{rotate_model}", "--register", "bad-vector"], "models:/no-such-base/1: Model Version (name=no-such-base, version=1) not found"),
    # -- artifacts -------------------------------------------------------------------------
    Case("truncated-vector-file", COMPOSE, "vectors[0]: {local}/truncated.tv.safetensors: truncated safetensors file", recipe=local_recipe({"vector": "{local}/truncated.tv.safetensors"})),
    Case("checkpoint-file-as-vector", COMPOSE, "vectors[0]: {local}/ft.safetensors: not a task vector", recipe=local_recipe({"vector": "{local}/ft.safetensors"})),
    Case("vector-from-another-base", COMPOSE, "vectors[1] was extracted from a different base: {local}/other.tv.safetensors records base fingerprint {other_base_fp}, the recipe's base {local}/base.safetensors has {base_fp}", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors"}, {"vector": "{local}/other.tv.safetensors"})),
    Case("nan-in-a-fine-tune", COMPOSE, "nan.safetensors holds NaN or Inf values", recipe=local_recipe({"finetuned": "{local}/nan.safetensors"})),
    Case("output-exists", ["compose", "{recipe}", "-o", "{local}/ft.safetensors"], "ft.safetensors: output already exists", recipe=local_recipe()),
    Case("tampered-stored-input", REGISTER, "vectors[0]: models:/bad-tampered-vector/1: downloaded weights have fingerprint ", recipe=registry_recipe({"vector": "models:/bad-tampered-vector/1"}), setup=_tampered_vector),
    # -- policy (permission-like refusals) ---------------------------------------------------
    Case("require-alias-unapproved", [*REGISTER, "--require-alias", "approved"], f"vectors[0] ({ROTATE}): version 1 of '{vector_name('rotate')}' does not carry the alias 'approved' the policy requires", recipe=registry_recipe(), process=True),
    Case("policy-unapproved-by-alias", REGISTER, "does not carry the alias 'approved'", recipe=registry_recipe({"vector": FLIP}, {"vector": f"models:/{vector_name('rotate')}@current"}, policy={"require_alias": "approved"})),
    Case("policy-local-input", COMPOSE, "vectors[0] ({local}/ft.tv.safetensors): not a registered model version, so it cannot carry the alias 'approved'", recipe=local_recipe(policy={"require_alias": "approved"})),
    Case("policy-logged-model-input", [*REGISTER, "--require-alias", "approved"], "models:/{rotate_model}: a logged model, not a registered model version", recipe=registry_recipe({"finetuned": "models:/{rotate_model}"})),
    Case("policy-runs-input", [*REGISTER, "--require-alias", "approved"], "vectors[0] (runs:/{rotate_run}/task_vector): not a registered model version", recipe=registry_recipe({"vector": "runs:/{rotate_run}/task_vector"})),
    Case("policy-missing-version", [*REGISTER, "--require-alias", "approved"], f"vectors[0]: models:/{vector_name('rotate')}/9: Model Version (name={vector_name('rotate')}, version=9) not found", recipe=registry_recipe({"vector": f"models:/{vector_name('rotate')}/9"})),
    Case("require-alias-empty", [*COMPOSE, "--require-alias", ""], "--require-alias: an alias name cannot be empty", recipe=local_recipe()),
    # -- PEFT LoRA adapters and export-lora ---------------------------------------------------
    Case("adapter-config-not-json", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/lora-not-json", "-o", "out/v.safetensors"], "lora-not-json/adapter_config.json: not a valid JSON adapter config"),
    Case("adapter-without-r", COMPOSE, "vectors[0]: {local}/lora-no-r/adapter_config.json: r: required field is missing", recipe=local_recipe({"vector": "{local}/lora-no-r"})),
    Case("adapter-r-zero", ["inspect", "{local}/lora-r-zero", "--base", "{local}/base.safetensors"], "lora-r-zero/adapter_config.json: r: 0 must be a positive integer"),
    Case("adapter-factors-disagree-with-r", COMPOSE, "module 'model.layers.0.attn' has factors A [2, 4] and B [4, 2], which disagree with its r = 3", recipe=local_recipe({"finetuned": "{local}/lora-r-three"})),
    Case("adapter-module-the-base-lacks", COMPOSE, "module 'model.layers.9.attn' changes 'model.layers.9.attn.weight', which the base {local}/base.safetensors lacks", recipe=local_recipe({"vector": "{local}/lora-absent"})),
    Case("adapter-shape-differs-from-the-base", ["similarity", "{local}/lora", "{local}/lora-wide", "--base", "{local}/base.safetensors"], "gives 'model.layers.0.attn.weight' the shape [4, 5], but it is [4, 4] in the base"),
    Case("adapter-dora", COMPOSE, "lora-dora/adapter_config.json: use_dora: DoRA adapters are not supported", recipe=local_recipe({"vector": "{local}/lora-dora"})),
    Case("adapter-ia3", COMPOSE, "lora-ia3/adapter_config.json: peft_type: 'IA3' is not LORA", recipe=local_recipe({"vector": "{local}/lora-ia3"})),
    Case("adapter-prompt-tuning", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/lora-prompt", "-o", "out/v.safetensors"], "peft_type: 'PROMPT_TUNING' is not LORA"),
    Case("export-lora-rank-zero", ["export-lora", "{local}/ft.tv.safetensors", "-o", "out/adapter", "--rank", "0"], "--rank: 0 must be a positive integer"),
    Case("export-lora-energy-above-one", ["export-lora", "{local}/ft.tv.safetensors", "-o", "out/adapter", "--energy", "1.5"], "--energy: 1.5 must be in (0, 1]"),
    Case("export-lora-no-matrix", ["export-lora", "{local}/norms.tv.safetensors", "-o", "out/adapter", "--rank", "2"], "export-lora: the vector has no 2-D weight tensor"),
    Case("export-lora-checkpoint-without-base", ["export-lora", "{local}/ft.safetensors", "-o", "out/adapter", "--rank", "2"], "{local}/ft.safetensors: is a checkpoint, not a task vector: give its --base"),
    Case("export-lora-neither-rank-nor-energy", ["export-lora", "{local}/ft.tv.safetensors", "-o", "out/adapter"], "give exactly one of --rank or --energy", exit_code=2),
    # -- approve, lineage, verify ----------------------------------------------------------
    Case("approve-local-path", ["approve", "{local}/ft.tv.safetensors", "--alias", "approved"], "ft.tv.safetensors: not a registered model version", process=True),
    Case("approve-runs-reference", ["approve", "runs:/{rotate_run}/task_vector", "--alias", "approved"], "runs:/{rotate_run}/task_vector: not a registered model version"),
    Case("approve-logged-model", ["approve", "models:/{rotate_model}", "--alias", "approved"], "models:/{rotate_model}: a logged model, not a registered model version"),
    Case("approve-missing-version", ["approve", f"models:/{vector_name('rotate')}/99", "--alias", "approved"], f"models:/{vector_name('rotate')}/99: Model Version (name={vector_name('rotate')}, version=99) not found"),
    Case("approve-reserved-alias", ["approve", ROTATE, "--alias", "latest"], "alias 'latest': 'latest' alias name (case insensitive) is reserved"),
    Case("approve-without-alias", ["approve", ROTATE], "Missing option '--alias'", exit_code=2),
    Case("lineage-missing-version", ["lineage", "models:/no-such-model/1"], "models:/no-such-model/1: Model Version (name=no-such-model, version=1) not found"),
    Case("lineage-local-path", ["lineage", "{local}/ft.tv.safetensors"], "{local}/ft.tv.safetensors: not a registered model version"),
    Case("verify-not-a-taskvec-version", ["verify", BASE], f"{BASE}: not a composite or task vector registered by mlflow-taskvec"),
    Case("verify-garbled-inputs-tag", ["verify", "models:/bad-garbled/1"], "models:/bad-garbled/1: the taskvec.inputs tag is not a JSON list of inputs", setup=_garbled_composite),
    Case("verify-missing-version", ["verify", f"models:/{vector_name('flip')}@nope"], f"models:/{vector_name('flip')}@nope: Registered model alias nope not found"),
]


# -- the world the cases run in ------------------------------------------------------------------


@dataclass
class World:
    registry: object
    client: object
    local: Path
    names: dict


def _local_checkpoints(folder: Path) -> None:
    folder.mkdir()
    base = base_state(0)
    save_file(base, str(folder / "base.safetensors"))
    save_file(finetune_state(base, 1), str(folder / "ft.safetensors"))
    TaskVector.extract(folder / "base.safetensors", folder / "ft.safetensors").save(folder / "ft.tv.safetensors")
    other = base_state(7)
    save_file(other, str(folder / "other.safetensors"))
    save_file(finetune_state(other, 8), str(folder / "other-ft.safetensors"))
    TaskVector.extract(folder / "other.safetensors", folder / "other-ft.safetensors").save(folder / "other.tv.safetensors")
    nan = finetune_state(base, 2)
    nan["model.layers.0.mlp.weight"][1, 1] = float("nan")
    save_file(nan, str(folder / "nan.safetensors"))
    TaskVector.extract(folder / "base.safetensors", folder / "ft.safetensors", include=["model.norm.*"]).save(folder / "norms.tv.safetensors")
    _local_adapters(folder)
    data = (folder / "ft.tv.safetensors").read_bytes()
    (folder / "truncated.tv.safetensors").write_bytes(data[: len(data) // 2])


def _local_adapters(folder: Path) -> None:
    """PEFT-format LoRA adapters on the local base: one good, the rest each wrong in one way."""
    g = torch.Generator().manual_seed(5)
    good = {"base_model.model.model.layers.0.attn.lora_A.weight": torch.randn(2, 4, generator=g),
            "base_model.model.model.layers.0.attn.lora_B.weight": torch.randn(4, 2, generator=g)}
    absent = {k.replace("layers.0", "layers.9"): v for k, v in good.items()}
    wide = {**good, "base_model.model.model.layers.0.attn.lora_A.weight": torch.randn(2, 5, generator=g)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["attn"]}
    for name, changes, tensors in (
        ("lora", {}, good), ("lora-no-r", {"r": None}, good), ("lora-r-zero", {"r": 0}, good),
        ("lora-r-three", {"r": 3}, good), ("lora-absent", {}, absent), ("lora-wide", {}, wide),
        ("lora-dora", {"use_dora": True}, good), ("lora-ia3", {"peft_type": "IA3"}, good),
        ("lora-prompt", {"peft_type": "PROMPT_TUNING"}, good), ("lora-not-json", None, good),
    ):
        (folder / name).mkdir()
        text = "{r: 2," if changes is None else json.dumps({k: v for k, v in {**config, **changes}.items() if v is not None})
        (folder / name / "adapter_config.json").write_text(text, "utf-8")
        save_file(tensors, str(folder / name / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    with mlflow_store(root / "store", template_db(tmp_path_factory)) as store:
        registry = build_registry(store)
        _local_checkpoints(root / "local")
        ft = registry.finetunes["rotate"]
        names = {
            "rotate_run": ft.run_id,
            "rotate_model": ft.model_id,
            "base_fp": open_checkpoint(root / "local" / "base.safetensors").fingerprint()[:16],
            "other_base_fp": open_checkpoint(root / "local" / "other.safetensors").fingerprint()[:16],
        }
        yield World(registry, store.client, root / "local", names)


def _fill(value, names: dict):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def registry_state(client) -> list:
    """Every version with its tags and aliases, and the number of runs."""
    versions = sorted((mv.name, str(mv.version), sorted((mv.tags or {}).items()), sorted(mv.aliases or [])) for mv in client.search_model_versions())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [versions, len(runs)]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_case(case: Case, args: list[str], work: Path) -> tuple[int, str, str]:
    env = {**case.env}
    if case.process:
        full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "mlflow_taskvec.cli", *args], cwd=work, env=full_env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    result = CliRunner().invoke(cli, args, env=env or None)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def test_the_catalogue_has_at_least_25_distinct_cases():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_clear_line_and_nothing_written(case, world, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    monkeypatch.chdir(work)
    names = {"local": str(world.local), "work": str(work), "recipe": str(work / "recipe.yaml"), **world.names}
    if case.recipe is not None:
        text = case.recipe if isinstance(case.recipe, str) else yaml.safe_dump(_fill(case.recipe, names), sort_keys=False)
        (work / "recipe.yaml").write_text(text, "utf-8")
    if case.setup is not None:
        case.setup(world)
    before, local_before, work_before = registry_state(world.client), files_under(world.local), files_under(work)

    code, stdout, stderr = run_case(case, _fill(case.args, names), work)

    lines = stderr.splitlines()
    if os.environ.get("SHOW_MESSAGES"):
        print(f"\nMSG {case.id}: {stderr.strip()}")
    assert code == case.exit_code, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    if case.exit_code == 2:  # click's usage errors: a usage line, a hint, then the error
        assert lines[-1].startswith("Error: ") and case.expected in lines[-1], stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
        assert _fill(case.expected, names) in lines[0], lines[0]
    assert registry_state(world.client) == before
    assert files_under(work) == work_before
    assert files_under(world.local) == local_before
