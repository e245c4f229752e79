"""The catalogue of bad input: one row per case, one test that runs them all.

Each case is the real ``mlflow-taskvec`` command (in-process through click's
CliRunner; the rows marked ``process`` as a real subprocess) against real files
and a real MLflow sqlite store. Every case must end the same way:

- a non-zero exit (1 for bad input, 2 for bad usage);
- exactly one line on stderr, ``Error: ...``, containing the expected fragment
  (and no traceback), and nothing on stdout;
- nothing registered or changed in the registry: every registered model, every
  version with its tags and aliases, every logged model and every run are the same
  afterwards (so no empty registered model and no logged model left without a
  version); a case marked ``fails_in_run`` fails inside the run it started, which
  must then be its only new run and end FAILED;
- nothing written: every file under the case's working folder (where outputs would
  go), the local checkpoints, the store's artifact root and the download cache
  (``MLFLOW_TASKVEC_CACHE``) has the same sha256 afterwards, and no file appeared or
  went. The cache already holds every valid registered input, so a case that reads
  them has nothing left to fetch.

To add a case, add a row to CASES. Placeholders in ``args`` and ``recipe``:
``{local}`` the folder of local checkpoints below, ``{work}`` the case's working
folder (the current directory), ``{recipe}`` the case's recipe file,
``{rotate_run}`` / ``{rotate_model}`` the rotate fine-tune's run and logged model ids,
``{nan_model}`` a logged fine-tune holding a NaN,
``{base_fp}`` / ``{other_base_fp}`` the first 16 hex digits of the local bases' fingerprints.
``SHOW_MESSAGES=1 pytest tests/test_bad_input.py -s`` prints every case's message.

Local checkpoints (``{local}``): ``base``, ``ft`` (a fine-tune of base), ``ft.tv``
(its task vector), ``other.tv`` (a task vector of another base), ``nan`` (a
fine-tune with a NaN), ``truncated.tv`` (a task vector cut in half), ``zero.tv``
(base minus itself), ``reshaped.tv`` (ft.tv with one tensor flattened), ``norms.tv``
(a vector of 1-D tensors only), ``base-link`` (a symlink to base), ``big16`` /
``big16-ft`` (float16 with values near its limit), ``ints`` / ``ints-ft`` (integer
tensors only), ``fractional-shape`` (a header with shape [32.7, 8]); all
``.safetensors``; ``hf/``, the base as an HF folder with a config, a tokenizer folder
and a dot file; and PEFT adapter folders ``lora`` (good) and ``lora-*`` (each wrong in
one way, see ``_local_adapters``). Every local file's sha256 is the same after each case.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow_helpers import (
    BASE_NAME,
    COMPOSITE_NAME,
    build_registry,
    finetune_of,
    flip_last_byte,
    log_checkpoint,
    mlflow_store,
    stored_weights,
    template_db,
    vector_name,
)
from safetensors.torch import save_file
from conftest import write_hf_dir
from small_models import base_state, finetune_state

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import TaskVecWarning
from mlflow_taskvec.recipe import parse_recipe
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.registry import register_composite, register_task_vector

# about 110 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(110)

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


def _truncated_vector(world) -> None:
    """A vector version whose stored weights file was cut in half (content of its own, as above)."""
    if world.client.search_model_versions("name = 'bad-truncated-vector'"):
        return
    base_ref = resolve(BASE)
    ft_ref = resolve(f"models:/{world.registry.finetunes['flip'].model_id}")
    vector = TaskVector.extract(base_ref.path, ft_ref.path, include=["encoder.*"], task="flip")
    reg = register_task_vector(vector, "bad-truncated-vector", base_ref, ft_ref)
    weights = stored_weights(world.client, reg.model_id)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _zero_vector(world) -> None:
    """A registered vector that is all zeros (the fine-tune's encoder set back to the base's), downloaded
    into the cache beforehand like every other valid input."""
    if not world.client.search_model_versions("name = 'bad-zero-vector'"):
        base_ref = resolve(BASE)
        vector = TaskVector.extract(base_ref.path, base_ref.path, include=["encoder.*"], task="zero")
        register_task_vector(vector, "bad-zero-vector", base_ref, base_ref)
    resolve("models:/bad-zero-vector/1")


def _garbled_composite(world) -> None:
    """A composite version whose taskvec.inputs tag was overwritten with something that is not a list of inputs."""
    reg = register_composite(parse_recipe(registry_recipe()), "bad-garbled")
    world.client.set_model_version_tag("bad-garbled", reg.version, "taskvec.inputs", '{"uri": "models:/x/1"}')


def _foreign_model(world) -> None:
    """A registered model whose version 1 is a plain MLflow model (registered without mlflow-taskvec)."""
    if not world.client.search_model_versions("name = 'plain-model'"):
        mlflow.register_model(f"models:/{world.registry.finetunes['rotate'].model_id}", "plain-model")


def _nan_finetune(world) -> None:
    """A logged fine-tune (no version) with a NaN in its weights: refused while composing, inside the run."""
    net = finetune_of(world.registry.base_net, seed=9)
    with torch.no_grad():
        net.encoder[0].weight[0, 0] = float("nan")
    with mlflow.start_run(run_name="finetune-nan"):
        world.names["nan_model"] = log_checkpoint(net, "finetuned").model_id
    resolve(f"models:/{world.names['nan_model']}")  # a valid download (its fingerprint is as recorded): cached, like the others


def _existing_side_outputs(world) -> None:
    """Files a side output must not replace without --overwrite (the case's working folder is the current one)."""
    for name in ("sim.png", "lineage.txt", "best.yaml"):
        Path("out", name).write_bytes(b"kept\n")


def _fifo(world) -> None:
    """A FIFO where the output goes: an output replaces only a regular file or a folder."""
    os.mkfifo("out/fifo")


FAILING_EVALUATION = {"evaluator": "digits_tasks:evaluate", "tasks": ["no-such-task"]}


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
    fails_in_run: bool = False  # refused inside the run it started: that run ends FAILED
    warning: bool = False  # accepted with one "Warning: ..." line (exit 0); only the output under out/ may appear


COMPOSE = ["compose", "{recipe}", "-o", "out/merged"]
# Nine levels of nine aliases: 9**9 (387 million) values once expanded, from 12 lines.
ALIAS_BOMB = "base: ./base.safetensors\nvectors: [{vector: ./v.safetensors}]\nevaluation:\n  evaluator: m:f\n  tasks: [a]\n  factory_kwargs:\n" + "".join(
    f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)
REGISTER = ["compose", "{recipe}", "--register", "bad-composite", "-o", "out/merged"]
SIMILARITY = ["similarity", "{local}/ft.tv.safetensors", "{local}/other.tv.safetensors"]
SEARCH = ["search", "{recipe}"]
SEARCH_RECIPE = registry_recipe(evaluation={"evaluator": "search_evaluators:nowhere", "tasks": ["rotate"]})

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
    Case("recipe-density-above-one", COMPOSE, "recipe.yaml: params.density: 1.5 must be a number in (0, 1]", recipe=local_recipe(method="ties", params={"density": 1.5})),
    Case("recipe-breadcrumbs-density-and-gamma-past-one", COMPOSE, "recipe.yaml: params.gamma: density 0.95 + gamma 0.1 = 1.05 is more than 1", recipe=local_recipe(method="breadcrumbs", params={"density": 0.95, "gamma": 0.1})),
    Case("recipe-della-epsilon-too-large", COMPOSE, "recipe.yaml: params.epsilon: 0.3 with density 0.2 gives keep probabilities from -0.1 to 0.5, not inside (0, 1)", recipe=local_recipe(method="della", params={"density": 0.2, "epsilon": 0.3})),
    Case("recipe-slerp-three-inputs", COMPOSE, "recipe.yaml: method 'slerp' merges exactly 2 task vectors, got 3", recipe=local_recipe(*[{"vector": "{local}/ft.tv.safetensors"}] * 3, method="slerp", params={"t": 0.5})),
    Case("recipe-slerp-t-outside-zero-one", COMPOSE, "recipe.yaml: params.t: 1.5 must be a number in [0, 1]", recipe=local_recipe(*[{"vector": "{local}/ft.tv.safetensors"}] * 2, method="slerp", params={"t": 1.5})),
    Case("recipe-iso-cts-common-fraction-outside", COMPOSE, "recipe.yaml: params.common_fraction: 1 must be a number in (0, 1)", recipe=local_recipe(method="iso_cts", params={"common_fraction": 1})),
    Case("recipe-exclude-glob-not-a-string", COMPOSE, "recipe.yaml: params.exclude: ['model.embed.*', 3] must be a list of glob strings", recipe=local_recipe(method="tsv_m", params={"exclude": ["model.embed.*", 3]})),
    Case("recipe-per-layer-weight-not-a-number", COMPOSE, "recipe.yaml: vectors[0].weight: ['*.attn.*']: 'x' is not a number", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "weight": {"*.attn.*": "x", "*": 1.0}})),
    Case("per-layer-weight-leaves-a-tensor-without-a-value", COMPOSE, "vectors[0].weight: no glob of ['*.attn.*', '*.mlp.*'] matches tensor 'model.embed.weight' (add a '*' default)", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "weight": {"*.attn.*": 0.5, "*.mlp.*": 1.5}})),
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
    Case("nan-in-a-fine-tune", COMPOSE, "tensor 'model.layers.0.mlp.weight' of {local}/nan.safetensors holds NaN or Inf values", recipe=local_recipe({"finetuned": "{local}/nan.safetensors"})),
    Case("output-exists", ["compose", "{recipe}", "-o", "{local}/ft.safetensors"], "ft.safetensors: output already exists", recipe=local_recipe()),
    Case("tampered-stored-input", REGISTER, "vectors[0]: models:/bad-tampered-vector/1: downloaded weights have fingerprint ", recipe=registry_recipe({"vector": "models:/bad-tampered-vector/1"}), setup=_tampered_vector),
    # -- policy (permission-like refusals) ---------------------------------------------------
    Case("require-alias-unapproved", [*REGISTER, "--require-alias", "approved"], f"vectors[0] ({ROTATE}): version 1 of '{vector_name('rotate')}' does not carry the alias 'approved' the policy requires", recipe=registry_recipe(), process=True),
    Case("policy-unapproved-by-alias", REGISTER, f"vectors[0] ({FLIP}): version 1 of '{vector_name('flip')}' does not carry the alias 'approved' the policy requires", recipe=registry_recipe({"vector": FLIP}, {"vector": f"models:/{vector_name('rotate')}@current"}, policy={"require_alias": "approved"})),
    Case("policy-local-input", COMPOSE, "vectors[0] ({local}/ft.tv.safetensors): not a registered model version, so it cannot carry the alias 'approved'", recipe=local_recipe(policy={"require_alias": "approved"})),
    Case("policy-logged-model-input", [*REGISTER, "--require-alias", "approved"], "models:/{rotate_model}: a logged model, not a registered model version", recipe=registry_recipe({"finetuned": "models:/{rotate_model}"})),
    Case("policy-runs-input", [*REGISTER, "--require-alias", "approved"], "vectors[0] (runs:/{rotate_run}/task_vector): not a registered model version", recipe=registry_recipe({"vector": "runs:/{rotate_run}/task_vector"})),
    Case("policy-missing-version", [*REGISTER, "--require-alias", "approved"], f"vectors[0]: models:/{vector_name('rotate')}/9: Model Version (name={vector_name('rotate')}, version=9) not found", recipe=registry_recipe({"vector": f"models:/{vector_name('rotate')}/9"})),
    Case("require-alias-empty", [*COMPOSE, "--require-alias", ""], "--require-alias: an alias name cannot be empty", recipe=local_recipe()),
    # -- PEFT LoRA adapters and export-lora ---------------------------------------------------
    Case("adapter-config-not-json", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/lora-not-json", "-o", "out/v.safetensors"], "lora-not-json/adapter_config.json: not a valid JSON adapter config"),
    Case("adapter-without-r", COMPOSE, "vectors[0]: {local}/lora-no-r/adapter_config.json: r: required field is missing", recipe=local_recipe({"vector": "{local}/lora-no-r"})),
    Case("adapter-r-zero", ["inspect", "{local}/lora-r-zero", "--base", "{local}/base.safetensors"], "lora-r-zero/adapter_config.json: r: 0 must be a positive whole number"),
    Case("adapter-factors-disagree-with-r", COMPOSE, "module 'model.layers.0.attn' has factors A [2, 4] and B [4, 2], which disagree with its r = 3", recipe=local_recipe({"finetuned": "{local}/lora-r-three"})),
    Case("adapter-module-the-base-lacks", COMPOSE, "module 'model.layers.9.attn' changes 'model.layers.9.attn.weight', which the base {local}/base.safetensors lacks", recipe=local_recipe({"vector": "{local}/lora-absent"})),
    Case("adapter-shape-differs-from-the-base", ["similarity", "{local}/lora", "{local}/lora-wide", "--base", "{local}/base.safetensors"], "gives 'model.layers.0.attn.weight' the shape [4, 5], but it is [4, 4] in the base"),
    Case("adapter-dora", COMPOSE, "lora-dora/adapter_config.json: use_dora: DoRA adapters are not supported", recipe=local_recipe({"vector": "{local}/lora-dora"})),
    Case("adapter-ia3", COMPOSE, "lora-ia3/adapter_config.json: peft_type: 'IA3' is not LORA", recipe=local_recipe({"vector": "{local}/lora-ia3"})),
    Case("adapter-prompt-tuning", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/lora-prompt", "-o", "out/v.safetensors"], "peft_type: 'PROMPT_TUNING' is not LORA"),
    Case("export-lora-rank-zero", ["export-lora", "{local}/ft.tv.safetensors", "-o", "out/adapter", "--rank", "0"], "--rank: 0 must be a positive whole number"),
    Case("export-lora-energy-above-one", ["export-lora", "{local}/ft.tv.safetensors", "-o", "out/adapter", "--energy", "1.5"], "--energy: 1.5 must be a number in (0, 1]"),
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
    # -- an output that is, contains or lies inside an input ---------------------------------
    Case("output-is-the-base", ["compose", "{recipe}", "-o", "{local}/base.safetensors", "--overwrite"], "{local}/base.safetensors: the output is the input {local}/base.safetensors; writing it would destroy what it is computed from", recipe=local_recipe()),
    Case("output-is-an-input-vector", ["compose", "{recipe}", "-o", "{local}/ft.tv.safetensors", "--overwrite"], "the output is the input {local}/ft.tv.safetensors", recipe=local_recipe()),
    Case("output-is-an-input-fine-tune", ["compose", "{recipe}", "-o", "{local}/ft.safetensors", "--overwrite"], "the output is the input {local}/ft.safetensors", recipe=local_recipe({"finetuned": "{local}/ft.safetensors"})),
    Case("output-is-the-base-folder", ["compose", "{recipe}", "-o", "{local}/hf", "--overwrite"], "{local}/hf: the output is the input {local}/hf;", recipe=local_recipe(base="{local}/hf")),
    Case("output-inside-the-base-folder", ["compose", "{recipe}", "-o", "{local}/hf/merged"], "{local}/hf/merged: the output lies inside the input {local}/hf;", recipe=local_recipe(base="{local}/hf")),
    Case("output-contains-the-inputs", ["compose", "{recipe}", "-o", "{local}", "--overwrite"], "the output contains the input {local}/base.safetensors", recipe=local_recipe()),
    Case("output-is-a-link-to-the-base", ["compose", "{recipe}", "-o", "{local}/base-link.safetensors", "--overwrite"], "the output is the input {local}/base.safetensors", recipe=local_recipe()),
    Case("base-through-a-link-is-the-output", ["compose", "{recipe}", "-o", "{local}/base.safetensors", "--overwrite"], "the output is the input {local}/base-link.safetensors", recipe=local_recipe(base="{local}/base-link.safetensors")),
    Case("extract-output-is-the-fine-tune", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/ft.safetensors", "-o", "{local}/ft.safetensors", "--overwrite"], "the output is the input {local}/ft.safetensors", process=True),
    Case("extract-output-is-the-base", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/ft.safetensors", "-o", "{local}/base.safetensors", "--overwrite"], "the output is the input {local}/base.safetensors"),
    Case("register-output-exists", [*REGISTER[:-1], "{local}/ft.safetensors"], "{local}/ft.safetensors: output already exists (pass --overwrite to replace it)", recipe=registry_recipe()),
    Case("register-output-is-the-base-folder", [*REGISTER[:-1], "{local}/hf", "--overwrite"], "{local}/hf: the output is the input {local}/hf;", recipe=local_recipe(base="{local}/hf")),
    Case("register-into-a-foreign-model", ["compose", "{recipe}", "--register", "plain-model"], "registered model 'plain-model' holds versions mlflow-taskvec did not register (version 1 has no taskvec.kind tag); register under another name, or pass --allow-mixed", recipe=registry_recipe(), setup=_foreign_model),
    Case("search-register-into-a-foreign-model", ["search", "{recipe}", "--register", "plain-model"], "registered model 'plain-model' holds versions mlflow-taskvec did not register", recipe=registry_recipe(evaluation={"evaluator": "search_evaluators:nowhere", "tasks": ["rotate"]}), setup=_foreign_model),
    Case("extract-register-into-a-foreign-model", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/ft.safetensors", "-o", "out/v.safetensors", "--register", "plain-model"], "registered model 'plain-model' holds versions mlflow-taskvec did not register", setup=_foreign_model),
    # -- side outputs (heatmap, lineage file and picture, winning recipe): the one output claim ----
    Case("heatmap-is-an-input-vector", [*SIMILARITY, "--heatmap", "{local}/ft.tv.safetensors"], "{local}/ft.tv.safetensors: the output is the input {local}/ft.tv.safetensors"),
    Case("heatmap-is-an-input-vector-with-overwrite", [*SIMILARITY, "--heatmap", "{local}/other.tv.safetensors", "--overwrite"], "the output is the input {local}/other.tv.safetensors"),
    Case("heatmap-is-the-adapter-base", ["similarity", "{local}/lora", "{local}/lora", "--base", "{local}/base.safetensors", "--heatmap", "{local}/base.safetensors", "--overwrite"], "the output is the input {local}/base.safetensors"),
    Case("heatmap-inside-an-adapter-folder", ["similarity", "{local}/lora", "{local}/lora", "--base", "{local}/base.safetensors", "--heatmap", "{local}/lora/sim.png"], "{local}/lora/sim.png: the output lies inside the input {local}/lora"),
    Case("heatmap-exists", [*SIMILARITY, "--heatmap", "out/sim.png"], "out/sim.png: output already exists (pass --overwrite to replace it)", setup=_existing_side_outputs),
    Case("heatmap-is-a-folder", [*SIMILARITY, "--heatmap", "out", "--overwrite"], "out: is a folder; the heatmap is a file (give a file path)"),
    Case("heatmap-is-a-fifo", [*SIMILARITY, "--heatmap", "out/fifo", "--overwrite"], "out/fifo: is a FIFO, not a regular file or folder; it is left as it is", setup=_fifo),
    Case("output-recipe-is-the-recipe", [*SEARCH, "--output-recipe", "{recipe}", "--overwrite"], "{recipe}: the output is the input {recipe}", recipe=SEARCH_RECIPE),
    Case("output-recipe-is-an-input-vector", [*SEARCH, "--output-recipe", "{local}/ft.tv.safetensors", "--overwrite"], "the output is the input {local}/ft.tv.safetensors",
         recipe=local_recipe(evaluation={"evaluator": "search_evaluators:nowhere", "tasks": ["rotate"]})),
    Case("output-recipe-exists", [*SEARCH, "--output-recipe", "out/best.yaml"], "out/best.yaml: output already exists (pass --overwrite to replace it)", recipe=SEARCH_RECIPE, setup=_existing_side_outputs),
    Case("output-recipe-into-a-missing-folder", [*SEARCH, "--output-recipe", "out/new/best.yaml"], "out/new/best.yaml: cannot write the winning recipe, there is no folder out/new", recipe=SEARCH_RECIPE),
    Case("output-recipe-is-a-folder", [*SEARCH, "--output-recipe", "out", "--overwrite"], "out: is a folder; the winning recipe is a file (give a file path)", recipe=SEARCH_RECIPE),
    Case("lineage-output-exists", ["lineage", ROTATE, "-o", "out/lineage.txt"], "out/lineage.txt: output already exists (pass --overwrite to replace it)", setup=_existing_side_outputs),
    Case("lineage-output-is-a-folder", ["lineage", ROTATE, "-o", "out"], "out: is a folder; the lineage file is a file (give a file path)"),
    Case("lineage-picture-is-a-folder", ["lineage", ROTATE, "--format", "png", "-o", "out", "--overwrite"], "out: is a folder; the lineage picture is a file (give a file path)"),
    Case("lineage-output-into-a-missing-folder", ["lineage", ROTATE, "-o", "out/new/lineage.txt"], "out/new/lineage.txt: cannot write the lineage file, there is no folder out/new"),
    Case("lineage-picture-is-a-fifo", ["lineage", ROTATE, "--format", "png", "-o", "out/fifo", "--overwrite"], "out/fifo: is a FIFO, not a regular file or folder", setup=_fifo),
    # the JSON and dot files go through the same claim as the text file
    Case("lineage-output-json-exists", ["lineage", ROTATE, "--format", "json", "-o", "out/lineage.txt"], "out/lineage.txt: output already exists (pass --overwrite to replace it)", setup=_existing_side_outputs),
    Case("lineage-output-dot-exists", ["lineage", ROTATE, "--format", "dot", "-o", "out/lineage.txt"], "out/lineage.txt: output already exists (pass --overwrite to replace it)", setup=_existing_side_outputs),
    Case("lineage-output-json-into-a-missing-folder", ["lineage", ROTATE, "--format", "json", "-o", "out/new/lineage.json"], "out/new/lineage.json: cannot write the lineage file, there is no folder out/new"),
    Case("lineage-output-dot-into-a-missing-folder", ["lineage", ROTATE, "--format", "dot", "-o", "out/new/lineage.dot"], "out/new/lineage.dot: cannot write the lineage file, there is no folder out/new"),
    Case("lineage-output-json-is-a-folder", ["lineage", ROTATE, "--format", "json", "-o", "out", "--overwrite"], "out: is a folder; the lineage file is a file (give a file path)"),
    Case("lineage-output-dot-is-a-fifo", ["lineage", ROTATE, "--format", "dot", "-o", "out/fifo", "--overwrite"], "out/fifo: is a FIFO, not a regular file or folder", setup=_fifo),
    Case("compose-over-a-fifo", [*COMPOSE[:-1], "out/fifo", "--overwrite"], "out/fifo: is a FIFO, not a regular file or folder; it is left as it is", recipe=local_recipe(), setup=_fifo),
    Case("extract-over-a-fifo", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/ft.safetensors", "-o", "out/fifo", "--overwrite"], "out/fifo: is a FIFO", setup=_fifo),
    # -- checks that come before any run --------------------------------------------------------
    Case("search-on-a-missing-device", [*SEARCH, "--device", "cuda:99", "--register", "bad-search"], "device: 'cuda:99'", recipe=SEARCH_RECIPE),
    Case("compose-register-on-a-missing-device", [*REGISTER, "--device", "cuda:99"], "device: 'cuda:99'", recipe=registry_recipe()),
    Case("search-register-a-name-mlflow-refuses", [*SEARCH, "--register", "bad/name"], "registered model name 'bad/name': Invalid model name 'bad/name'. Names cannot contain '/' or ':'.", recipe=SEARCH_RECIPE),
    Case("compose-register-a-name-mlflow-refuses", ["compose", "{recipe}", "--register", "bad:name"], "registered model name 'bad:name': Invalid model name", recipe=registry_recipe()),
    Case("extract-register-a-name-mlflow-refuses", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/ft.safetensors", "--register", "a/b"], "registered model name 'a/b': Invalid model name"),
    Case("compress-an-adapter-without-its-base", ["compress", "{local}/lora", "--format", "sparse", "--density", "0.5", "-o", "out/c.safetensors"], "{local}/lora: a LoRA adapter is a task vector of its base: give the base"),
    # -- accepted, with one warning line: what would otherwise pass unnoticed ------------------
    Case("compose-an-all-zero-vector", COMPOSE, "vectors[0] (task vector from {local}/zero.tv.safetensors): the task vector is all zeros, so it changes nothing", recipe=local_recipe({"vector": "{local}/zero.tv.safetensors"}), warning=True),
    Case("compose-an-all-zero-registered-vector", COMPOSE, "vectors[0] (task vector 'zero' from models:/bad-zero-vector/1): the task vector is all zeros, so it changes nothing", recipe=registry_recipe({"vector": "models:/bad-zero-vector/1"}), setup=_zero_vector, warning=True),
    Case("compose-an-adapter-with-lora-alpha-zero", COMPOSE, "vectors[0] (task vector from {local}/lora-alpha-zero): the task vector is all zeros", recipe=local_recipe({"vector": "{local}/lora-alpha-zero"}), warning=True),
    Case("compose-an-adapter-without-weights", COMPOSE, "vectors[0] (task vector from {local}/lora-no-weights): the task vector is all zeros, so it changes nothing", recipe=local_recipe({"vector": "{local}/lora-no-weights"}), warning=True),
    Case("per-layer-glob-matching-no-tensor", COMPOSE, "vectors[0].weight: the glob 'model.nope.*' matches no tensor of the inputs, so its value 2 is unused", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "weight": {"model.nope.*": 2, "*": 1}}), warning=True),
    Case("per-layer-scale-glob-matching-no-tensor", COMPOSE, "scale: the glob '*.nope' matches no tensor of the inputs", recipe=local_recipe(scale={"*.nope": 0.5, "*": 1.0}), warning=True),
    # -- numbers beyond what the computation can hold ------------------------------------------
    Case("scale-beyond-float32", COMPOSE, "scale: 1e+39 is beyond the largest float32 (3.4e+38) for tensor", recipe=local_recipe(scale=1e39)),
    Case("weight-beyond-float32", COMPOSE, "vectors[0].weight: 1e+39 is beyond the largest float32 (3.4e+38) for tensor", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "weight": 1e39})),
    Case("weight-times-scale-beyond-float32", COMPOSE, "vectors[0].weight: 1e+30 (times scale 1e+30: 1e+60) is beyond the largest float32", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "weight": 1e30}, scale=1e30)),
    Case("per-layer-weight-beyond-float32", COMPOSE, "vectors[0].weight: 1e+39 is beyond the largest float32", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors", "weight": {"model.embed.*": 1e39, "*": 1.0}}), process=True),
    # -- inputs of the wrong kind -------------------------------------------------------------
    Case("vector-given-as-finetuned", COMPOSE, "vectors[0]: {local}/ft.tv.safetensors: is a task vector, not a fine-tuned checkpoint (in a recipe, use vector: instead of finetuned:)", recipe=local_recipe({"finetuned": "{local}/ft.tv.safetensors"})),
    Case("extract-vector-given-as-finetuned", ["extract", "--base", "{local}/base.safetensors", "--finetuned", "{local}/ft.tv.safetensors", "-o", "out/v.safetensors"], "{local}/ft.tv.safetensors: is a task vector, not a fine-tuned checkpoint"),
    Case("dev-null-as-base", COMPOSE, "/dev/null: not a regular file or a folder, so it holds no safetensors weights", recipe=local_recipe(base="/dev/null")),
    Case("fractional-shape-in-a-header", COMPOSE, "{local}/fractional-shape.safetensors: corrupt safetensors header (entry 'w' lacks dtype, or its shape or data_offsets are not lists of whole numbers)", recipe=local_recipe({"vector": "{local}/fractional-shape.safetensors"})),
    Case("extract-without-floating-tensors", ["extract", "--base", "{local}/ints.safetensors", "--finetuned", "{local}/ints-ft.safetensors", "-o", "out/v.safetensors"], "{local}/ints.safetensors: has no floating-point tensors, so there is no task vector to extract"),
    Case("inputs-with-different-shapes", COMPOSE, "tensor 'model.embed.weight' has shape [8, 4] in vectors[0] (task vector from {local}/ft.tv.safetensors) but [32] in vectors[1] (task vector from {local}/reshaped.tv.safetensors)", recipe=local_recipe({"vector": "{local}/ft.tv.safetensors"}, {"vector": "{local}/reshaped.tv.safetensors"})),
    # -- non-finite outputs -------------------------------------------------------------------
    Case("output-overflows-float16", COMPOSE, "tensor 'w': 16 entries of the output are not finite in float16; write it as dtype: float32, or set allow_nonfinite to accept them", recipe={"base": "{local}/big16.safetensors", "scale": 2.0, "vectors": [{"finetuned": "{local}/big16-ft.safetensors"}]}),
    Case("dtype-float16-overflows", COMPOSE, "entries of the output are not finite in float16; write it as dtype: float32", recipe=local_recipe(dtype="float16", scale=1.0e7)),
    # -- YAML that would explode or is not what it seems ---------------------------------------
    Case("yaml-alias-bomb", COMPOSE, "recipe.yaml: the YAML expands to more than 100000 values through its aliases", recipe=ALIAS_BOMB, process=True),
    Case("yaml-recursive-alias", COMPOSE, "recipe.yaml: the alias *loop refers to a collection that contains it", recipe="base: x\nvectors: &loop [*loop]\n"),
    Case("yaml-too-deep", COMPOSE, "recipe.yaml: the YAML is nested more than 50 levels deep", recipe="base: x\nvectors: " + "[" * 60 + "]" * 60 + "\n"),
    Case("yaml-too-large", COMPOSE, "recipe.yaml: larger than 1024 KiB, which no recipe needs", recipe="base: x\n" + "# padding\n" * 120_000),
    # -- files named in messages --------------------------------------------------------------
    Case("similarity-of-a-zero-vector", ["similarity", "{local}/zero.tv.safetensors", "{local}/ft.tv.safetensors"], "{local}/zero.tv.safetensors: the task vector is all zeros, so its cosine similarity is undefined"),
    Case("heatmap-into-a-missing-folder", ["similarity", "{local}/ft.tv.safetensors", "{local}/ft.tv.safetensors", "--heatmap", "/nonexistent/dir/x.png"], "/nonexistent/dir/x.png: cannot write the heatmap, there is no folder /nonexistent/dir"),
    Case("inspect-truncated-registered-model", ["inspect", "models:/bad-truncated-vector/1"], "models:/bad-truncated-vector/1: its stored weights are unreadable: truncated safetensors file (tensor 'encoder.0.weight' ends at byte", setup=_truncated_vector),
    Case("verify-missing-version", ["verify", f"models:/{vector_name('flip')}@nope"], f"models:/{vector_name('flip')}@nope: Registered model alias nope not found"),
    # -- search, inspect, similarity, report --------------------------------------------
    Case("search-without-evaluation", ["search", "{recipe}", "--register", "bad-search"], "search needs an 'evaluation' block in the recipe (evaluator and tasks)", recipe=registry_recipe()),
    Case("search-failing-evaluator", ["search", "{recipe}", "--register", "bad-search"], "digits_tasks:evaluate failed on task 'no-such-task': ValueError: unknown task", recipe=registry_recipe(evaluation=FAILING_EVALUATION), fails_in_run=True),
    Case("inspect-missing", ["inspect", "{local}/missing.safetensors"], "{local}/missing.safetensors: no such file or directory"),
    Case("inspect-truncated", ["inspect", "{local}/truncated.tv.safetensors", "--layers"], "{local}/truncated.tv.safetensors: truncated safetensors file"),
    Case("similarity-checkpoint-as-vector", ["similarity", "{local}/ft.tv.safetensors", "{local}/ft.safetensors", "--heatmap", "out/sim.png"], "{local}/ft.safetensors: not a task vector (its metadata has no taskvec.base_fingerprint)"),
    Case("similarity-one-vector", ["similarity", "{local}/ft.tv.safetensors"], "give at least two task vectors", exit_code=2),
    Case("report-unknown-name", ["report", "no-such-model"], "no-such-model: no registered model or experiment of this name"),
    Case("report-bad-format", ["report", COMPOSITE_NAME, "--format", "xml"], "Invalid value for '--format'", exit_code=2),
    # -- refused inside a run: the run ends FAILED, nothing logged stays ---------------------
    Case("nan-in-a-registered-fine-tune", REGISTER, "tensor 'encoder.0.weight' of models:/{nan_model} holds NaN or Inf values", recipe=registry_recipe({"finetuned": "models:/{nan_model}"}), setup=_nan_finetune, fails_in_run=True),
    Case("nan-in-a-registered-fine-tune-composed-locally", COMPOSE, "tensor 'encoder.0.weight' of models:/{nan_model} holds NaN or Inf values", recipe=registry_recipe({"finetuned": "models:/{nan_model}"}), setup=_nan_finetune),
    Case("compose-failing-evaluator", REGISTER, "digits_tasks:evaluate failed on task 'no-such-task': ValueError: unknown task", recipe=registry_recipe(evaluation=FAILING_EVALUATION), fails_in_run=True),
]


# -- the world the cases run in ------------------------------------------------------------------


@dataclass
class World:
    registry: object
    client: object
    local: Path
    names: dict
    admin: Callable = contextlib.nullcontext  # the store's credentials, for a case to run with

    @property
    def written_folders(self) -> list[Path]:
        """Where a command may write: the local checkpoints, the store's artifact root, the download cache."""
        store = self.registry.store
        return [self.local, store.artifacts, store.cache]


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
    with pytest.warns(TaskVecWarning, match="all zeros"):
        TaskVector.extract(folder / "base.safetensors", folder / "base.safetensors").save(folder / "zero.tv.safetensors")
    vector = TaskVector.load(folder / "ft.tv.safetensors")
    reshaped = {n: vector.get_tensor(n).reshape(-1) if n == "model.embed.weight" else vector.get_tensor(n) for n in vector.names}
    save_file(reshaped, str(folder / "reshaped.tv.safetensors"), metadata=vector.metadata())
    (folder / "base-link.safetensors").symlink_to("base.safetensors")
    save_file({"w": torch.full((4, 4), 30000.0, dtype=torch.float16)}, str(folder / "big16.safetensors"))
    save_file({"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}, str(folder / "big16-ft.safetensors"))
    save_file({"ids": torch.arange(4)}, str(folder / "ints.safetensors"))
    save_file({"ids": torch.arange(4) + 1}, str(folder / "ints-ft.safetensors"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [32.7, 8], "data_offsets": [0, 1024]}}).encode("utf-8")
    (folder / "fractional-shape.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(1024))
    write_hf_dir(folder / "hf", base, extra_files={"config.json": "{}", ".gitattributes": "*.safetensors lfs\n"})
    (folder / "hf" / "tokenizer").mkdir()
    (folder / "hf" / "tokenizer" / "vocab.txt").write_text("a\nb\n", "utf-8")


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
        ("lora-alpha-zero", {"lora_alpha": 0}, good), ("lora-no-weights", {}, {}),
    ):
        (folder / name).mkdir()
        text = "{r: 2," if changes is None else json.dumps({k: v for k, v in {**config, **changes}.items() if v is not None})
        (folder / name / "adapter_config.json").write_text(text, "utf-8")
        save_file(tensors, str(folder / name / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    with mlflow_store(root / "store", template_db(tmp_path_factory)) as store:
        yield _world(build_registry(store), store.client, root / "local")


def _world(registry, client, local: Path) -> World:
    """The cases' world on ``registry``'s store: the local checkpoints, the names, every valid registered input cached."""
    _local_checkpoints(local)
    ft = registry.finetunes["rotate"]
    names = {
        "rotate_run": ft.run_id,
        "rotate_model": ft.model_id,
        "base_fp": open_checkpoint(local / "base.safetensors").fingerprint()[:16],
        "other_base_fp": open_checkpoint(local / "other.safetensors").fingerprint()[:16],
    }
    for valid_input in (BASE, ROTATE, FLIP, f"models:/{registry.finetunes['rotate'].model_id}"):
        resolve(valid_input)  # cached now: a case that reads it has no reason to write the cache
    return World(registry, client, local, names)


def _fill(value, names: dict):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def registry_state(client) -> dict:
    """Every registered model, every version with its tags and aliases, every logged model, and every run with its status."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {
        "registered models": sorted((rm.name, sorted((rm.tags or {}).items())) for rm in client.search_registered_models()),
        "versions": sorted((mv.name, str(mv.version), sorted((mv.tags or {}).items()), sorted(mv.aliases or [])) for mv in client.search_model_versions()),
        "logged models": sorted(m.model_id for m in client.search_logged_models(experiments)),
        "runs": {r.info.run_id: r.info.status for r in client.search_runs(experiments)},
    }


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (and every folder, as ``dir``), by relative path."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "not a file"
        for p in sorted(Path(folder).rglob("*"))
    }


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
    check_case(case, world, tmp_path, monkeypatch)


# The cases that involve registration (registered model names, references to the registry, the
# policy, approval, lineage and verification) run again against the PostgreSQL team server. Left
# out: the two whose setup tampers with a stored file (the server's artifact store is its own).
TEAM_SERVER_CASES = [
    c for c in CASES
    if any(mark in str([c.args, c.recipe]) for mark in ("--register", "models:/", "runs:/", "'approve'", "'lineage'", "'verify'"))
    and c.setup not in (_tampered_vector, _truncated_vector)
    and not c.id.startswith(("output-recipe-", "lineage-output-", "lineage-picture-"))  # side outputs: the same claim as on sqlite
]


@pytest.fixture(scope="module")
def team_world(tmp_path_factory):
    """The world of the cases on the PostgreSQL team server (tests/team_server.py), started once
    for this module: the same registry built there by its admin, the same local checkpoints."""
    from mlflow_helpers import Store
    from mlflow.tracking import MlflowClient
    from team_server import ADMIN_USER, start_server

    root = tmp_path_factory.mktemp("bad-input-team")
    server = start_server(root / "server")
    try:
        with server.as_user(ADMIN_USER):
            experiment_id = MlflowClient().create_experiment("bad-input")
        settings = {"MLFLOW_EXPERIMENT_ID": experiment_id, "MLFLOW_TASKVEC_CACHE": str(root / "cache")}
        with server.as_user(ADMIN_USER, **settings):
            client = MlflowClient()
            registry = build_registry(Store(root, server.url, experiment_id, root / "cache", server.artifacts, client))
            world = _world(registry, client, root / "local")
        world.admin = lambda: server.as_user(ADMIN_USER, **settings)
        yield world
    finally:
        server.close()


@pytest.mark.parametrize("case", TEAM_SERVER_CASES, ids=[c.id for c in TEAM_SERVER_CASES])
def test_bad_input_against_the_team_server_is_refused_alike(case, team_world, tmp_path, monkeypatch):
    with team_world.admin():
        check_case(case, team_world, tmp_path, monkeypatch)


def check_case(case: Case, world: World, tmp_path: Path, monkeypatch) -> None:
    """Run ``case`` in ``world`` and check that it ends as every case must (the module's docstring)."""
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    monkeypatch.chdir(work)
    if case.setup is not None:
        case.setup(world)
    names = {"local": str(world.local), "work": str(work), "recipe": str(work / "recipe.yaml"), **world.names}
    if case.recipe is not None:
        text = case.recipe if isinstance(case.recipe, str) else yaml.safe_dump(_fill(case.recipe, names), sort_keys=False)
        (work / "recipe.yaml").write_text(text, "utf-8")
    folders = [work, *world.written_folders]
    before, files_before = registry_state(world.client), [file_digests(f) for f in folders]

    code, stdout, stderr = run_case(case, _fill(case.args, names), work)

    lines = stderr.splitlines()
    if os.environ.get("SHOW_MESSAGES"):
        print(f"\nMSG {case.id}: {stderr.strip()}")
    if case.warning:
        assert code == 0, stderr
        assert len(lines) == 1 and lines[0].startswith("Warning: ") and _fill(case.expected, names) in lines[0], stderr
        assert registry_state(world.client) == before
        assert [file_digests(f) for f in world.written_folders] == files_before[1:]
        assert {k: v for k, v in file_digests(work).items() if not k.startswith("out/")} == {k: v for k, v in files_before[0].items() if not k.startswith("out/")}
        return
    assert code == case.exit_code, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    if case.exit_code == 2:  # click's usage errors: a usage line, a hint, then the error
        assert lines[-1].startswith("Error: ") and case.expected in lines[-1], stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
        assert _fill(case.expected, names) in lines[0], lines[0]
    after = registry_state(world.client)
    runs_before, runs_after = before.pop("runs"), after.pop("runs")
    assert after == before
    assert {run: status for run, status in runs_after.items() if run in runs_before} == runs_before
    new_run_statuses = [status for run, status in runs_after.items() if run not in runs_before]
    if case.fails_in_run:
        assert new_run_statuses and set(new_run_statuses) == {"FAILED"}, new_run_statuses
    else:
        assert new_run_statuses == []
    assert [file_digests(f) for f in folders] == files_before


def test_allow_mixed_registers_beside_versions_mlflow_taskvec_did_not_make(world, tmp_path, monkeypatch):
    _foreign_model(world)
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(registry_recipe()), "utf-8")

    result = CliRunner().invoke(cli, ["compose", str(recipe), "--register", "plain-model", "--allow-mixed"])

    assert result.exit_code == 0, result.output
    versions = {str(mv.version): mv.tags.get("taskvec.kind") for mv in world.client.search_model_versions("name = 'plain-model'")}
    assert versions == {"1": None, "2": "composite"}
