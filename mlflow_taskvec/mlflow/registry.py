"""Registering task vectors and composites with their lineage.

Each registered version carries ``taskvec.*`` tags (written in the same call
that creates the version, so a version never exists without its lineage) and a
Markdown description whose table shows, in the registry UI, what the model is
made of.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_model_name

from mlflow_taskvec.compose import base_with_adapter, compose_to, compose_to_adapter, write_model_card
from mlflow_taskvec.engine.coefficients import Coefficient
from mlflow_taskvec.engine.device import parse_device
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.output import OutputClaim, check_output_path, refuse_aliasing
from mlflow_taskvec.errors import TaskVecError, TaskVecWarning
from mlflow_taskvec.mlflow import flavor
from mlflow_taskvec.mlflow import flavor_conf as conf_keys
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow.downloads import Resolved, resolve
from mlflow_taskvec.mlflow.evaluate import composite_evaluation, fine_tuning_of, module_builder
from mlflow_taskvec.mlflow.inputs import resolve_inputs
from mlflow_taskvec.mlflow.lineage_plot import log_lineage_picture
from mlflow_taskvec.mlflow.runs import owned_run
from mlflow_taskvec.mlflow.server import check_can_register, server_error, server_errors, unanswered
from mlflow_taskvec.modelcard import LINEAR_NOTE, hub_name_of, md_code, md_text
from mlflow_taskvec.recipe import Recipe
from mlflow_taskvec.references import is_local, open_reference
from mlflow_taskvec.signals import completed, finish_first, stage, stages_owned_by
from mlflow_taskvec.tables import smaller_by

FINE_TUNINGS = ("standard", "linear")
REGISTRATION = "registration"  # the owner of a registration's stages (signals.stages_owned_by)


def _fmt(value: Coefficient) -> str:
    """A number for tags and descriptions; a per-layer coefficient as JSON, its globs in order."""
    return json.dumps(value) if isinstance(value, dict) else f"{value:.6g}"


_URI_COMPONENT_SAFE = "!*'()"  # what encodeURIComponent leaves as it is, besides letters, digits and -_.~


def version_page(name: str, version: str) -> str:
    """The registry UI's page of a model version, relative to the UI (its hash router's route,
    with the name encoded as the UI's own links encode it: encodeURIComponent)."""
    return f"#/models/{quote(name, safe=_URI_COMPONENT_SAFE)}/versions/{version}"


def _model_cell(res: Resolved, text: str | None = None) -> str:
    """A description table's cell naming ``res``: a link to its version page when it is a registered version."""
    shown = md_code(text or res.name or res.canonical)
    return f"[{shown}]({version_page(res.name, res.version)})" if res.name and res.version else shown


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:  # created concurrently by someone else: fine
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise


@contextlib.contextmanager
def _without_info(logger_name: str):
    """``logger_name``'s INFO lines left out (errors and warnings still shown)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _without_transformers_bars():
    """transformers' own progress bars (loading the base, writing the adapter) left out: what a
    command prints on stderr is its warnings and its one error line."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def _create_version(name: str, model_info, run_id: str, tags: dict, description: str) -> ModelVersion:
    client = MlflowClient()
    try:
        _ensure_registered_model(client, name)
        # Against a tracking server MLflow logs "Waiting up to 300 seconds for model version to finish
        # creation" on stderr while it waits for READY: not a line of ours (a failure is one line).
        with _without_info("mlflow.store.model_registry.abstract_store"):
            return client.create_model_version(
                name,
                source=model_info.model_uri,
                run_id=run_id,
                tags={k: str(v) for k, v in tags.items()},
                description=description,
                model_id=model_info.model_id,
            )
    except MlflowException as exc:
        raise server_error(exc, f"registering {name!r} failed", name) from None


def _complete_version(
    finishing: contextlib.ExitStack, name: str, info, run_id: str, tags: dict, description: str, alias: str | None,
    output=None, noun: str = "composite", move=None, picture: bool = False,
) -> tuple[ModelVersion, list[str]]:
    """Create the version of ``name`` and complete it (``move``: the final move of the output;
    the lineage picture; the alias), inside the run ``run_id``. From the version's creation on a
    signal waits for the registration to complete (``finish_first``, held by ``finishing`` until
    the run has ended FINISHED); a failure deletes the version again: never a READY version
    beside a FAILED run. Returns the version and what was created, for ``_what_stands``."""
    stage("logging", owner=REGISTRATION)
    created: list[str] = []
    finishing.enter_context(finish_first(lambda: _what_stands(created, run_id, output, noun=noun)))
    mv = _create_version(name, info, run_id, tags, description)
    created.append(f"models:/{name}/{mv.version}")
    try:
        stage("registering", owner=REGISTRATION)
        if move is not None:
            stage("final-move", owner=REGISTRATION)
            move()
        if picture:
            log_lineage_picture(f"models:/{name}/{mv.version}")
        stage("tagging", owner=REGISTRATION)
        if alias:  # inside the deferral: a signal waits for the alias too
            MlflowClient().set_registered_model_alias(name, alias, mv.version)
    except BaseException:  # the run ends FAILED: its version goes too
        with contextlib.suppress(Exception):
            MlflowClient().delete_model_version(name, mv.version)
        raise
    return mv, created



def _registration_done(created: list[str], run_id: str, output, noun: str = "composite") -> None:
    """The registration is complete (its run ended): record what a signal from now on leaves, and enter ``done``."""
    completed(_what_stands(created, run_id, output, finished_first=False, noun=noun))
    stage("done")

def _asks_the_server_first(register):
    """Check the user's permission on the registered model before anything is written, and
    turn what the tracking server refuses or fails into one sentence (tracking/server.py).
    A run the registration starts ends FAILED when anything goes wrong inside it."""
    signature = inspect.signature(register)

    @functools.wraps(register)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        name = bound.arguments["name"]
        with server_errors(f"registering {name!r} failed", name):
            check_destination(name, bound.arguments["allow_mixed"])
            return register(*args, **kwargs)

    return wrapper


def check_destination(name: str, allow_mixed: bool = False) -> None:
    """What can be known before anything is written about registering into ``name``: the user may
    (when the server says), and its versions are ours (unless ``allow_mixed``)."""
    check_model_name(name)
    with server_errors(f"registering {name!r} failed", name):
        check_can_register(name)
        if not allow_mixed:
            refuse_foreign_versions(name)


def check_model_name(name: str) -> None:
    """Refuse a registered model name MLflow would refuse, before any run is started (MLflow's own rule)."""
    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise TaskVecError(f"registered model name {name!r}: {exc.message}") from None


def check_recipe_device(recipe: Recipe) -> None:
    """Refuse, before any run is started, a recipe device this machine does not have."""
    parse_device(recipe.device)


def refuse_foreign_versions(name: str) -> None:
    """Refuse adding versions to a registered model whose versions mlflow-taskvec did not make
    (a plain pyfunc model, say): its lineage, reports and verification would mix two worlds."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if unanswered(exc):  # a server that does not answer: fail now, not after every later request
            raise
        return  # no such model yet, or a name the search cannot quote: nothing to mix with
    foreign = sorted((int(mv.version) for mv in versions if mv.name == name and tag.KIND not in (mv.tags or {})))
    if foreign:
        raise TaskVecError(
            f"registered model {name!r} holds versions mlflow-taskvec did not register (version {foreign[0]} has no {tag.KIND} tag); "
            "register under another name, or pass --allow-mixed to add to it anyway"
        )


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str  # models:/<model_id>
    model_id: str
    run_id: str
    tags: dict
    compression: object = None  # for a compressed vector: the engine's CompressionResult

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def summary(self) -> str:
        """The one line every registering command prints: the version, its logged model and run."""
        return f"registered: {self.version_uri}  (model {self.model_uri}, run {self.run_id})"


@_asks_the_server_first
def register_task_vector(
    vector: TaskVector,
    name: str,
    base: Resolved,
    finetuned: Resolved,
    run_id: str | None = None,
    alias: str | None = None,
    allow_mixed: bool = False,
    fine_tuning: str = "standard",
    output: "str | os.PathLike | None" = None,
) -> Registered:
    """Log ``vector`` as a ``task_vector`` model of the fine-tune's run and register a version.

    ``output``: where the vector was also written (named in what a signal's message says stands).

    A registered model ``name`` whose versions mlflow-taskvec did not make is refused unless ``allow_mixed``.
    ``fine_tuning="linear"``: the fine-tune was trained linearized at the base (``engine.linearize``);
    the version is tagged ``taskvec.fine_tuning=linear`` and composites of it are evaluated linearized.

    The run is ``run_id`` if given, else the fine-tune's own run when the fine-tune
    is an MLflow model or run artifact, else the active run, else a new run.
    """
    if fine_tuning not in FINE_TUNINGS:
        raise TaskVecError(f"fine_tuning {fine_tuning!r} is not one of {', '.join(FINE_TUNINGS)}")
    run_id = run_id or finetuned.run_id
    local_paths = _local_paths([base.uri, finetuned.uri])
    finishing = contextlib.ExitStack()  # from the version's creation on, a signal waits for the registration to complete
    with stages_owned_by(REGISTRATION), finishing, owned_run(run_id) as run:
        lineage = {conf_keys.BASE_URI: base.canonical, conf_keys.FINETUNED_URI: finetuned.canonical, conf_keys.FINETUNED_FINGERPRINT: finetuned.fingerprint}
        info = flavor.log_model(vector, name="task_vector", lineage=lineage)
        conf = info.flavors[flavor.FLAVOR_NAME]
        tags = {
            tag.KIND: tag.TASK_VECTOR,
            tag.TASK: vector.task or "",
            tag.BASE_URI: base.canonical,
            tag.BASE_FINGERPRINT: vector.base_fingerprint,
            tag.FINETUNED_URI: finetuned.canonical,
            tag.FINGERPRINT: conf[conf_keys.FINGERPRINT],
            tag.NUM_PARAMETERS: conf[conf_keys.NUM_PARAMETERS],
            tag.L2_NORM: _fmt(conf[conf_keys.L2_NORM]),
            **({tag.REPRODUCIBLE: "false"} if local_paths else {}),
            **({tag.FINE_TUNING: fine_tuning} if fine_tuning != "standard" else {}),
        }
        MlflowClient().set_logged_model_tags(info.model_id, {k: str(v) for k, v in tags.items()})
        description = _vector_description(vector, base, finetuned, conf)
        mv, created = _complete_version(finishing, name, info, run.info.run_id, tags, description, alias, output=output, noun="task vector")
    registered = Registered(name, str(mv.version), info.model_uri, info.model_id, run.info.run_id, tags)
    _warn_not_reproducible(registered, local_paths)
    _registration_done(created, run.info.run_id, output, noun="task vector")
    return registered


@_asks_the_server_first
def register_compressed_vector(
    source_ref: str,
    name: str,
    layout: str,
    density: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    output: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    alias: str | None = None,
    device: str | None = None,
    allow_mixed: bool = False,
    base: str | None = None,
) -> Registered:
    """Compress the task vector ``source_ref`` (a PEFT LoRA adapter's with its ``base``) (``engine.compressed``) and register the result.

    The compressed vector is logged in the source vector's run (else the active or a new
    run) as a ``task_vector`` model; its version carries the source's lineage tags, its
    own fingerprint (of the densified vector), the layout, stored and dense sizes, and
    ``taskvec.compressed_from`` naming the source version. With ``output`` it is also
    kept there.
    """
    from mlflow_taskvec.engine.compressed import check_settings, compress
    from mlflow_taskvec.mlflow.downloads import resolve

    check_settings(layout, density, rank, energy)
    if output is not None:
        check_output_path(output, overwrite)
    source = resolve(source_ref)
    vector = TaskVector.load(open_reference(source.path, base=open_reference(resolve(base).path) if base else None))
    recorded = {**(source.conf or {}), **source.tags}  # a registered version's tags, else its flavor block
    # The registration marks its own stages: the compressed file's write (to output, or into tmp) none.
    with stages_owned_by(REGISTRATION), tempfile.TemporaryDirectory(prefix="taskvec-compress-") as tmp:
        stage("writing", owner=REGISTRATION)
        target = Path(output) if output is not None else Path(tmp) / "vector.safetensors"
        result = compress(vector, target, layout, density, rank, energy, source_fingerprint=source.fingerprint, overwrite=overwrite, device=device)
        finishing = contextlib.ExitStack()  # from the version's creation on, a signal waits for the registration to complete
        with finishing, owned_run(source.run_id) as run:
            lineage = {conf_keys.COMPRESSED_FROM: source.canonical, conf_keys.BASE_URI: recorded.get(tag.BASE_URI) or recorded.get(conf_keys.BASE_URI, "")}
            info = flavor.log_model(str(target), name="task_vector", lineage=lineage)
            conf = info.flavors[flavor.FLAVOR_NAME]
            tags = {
                tag.KIND: tag.TASK_VECTOR,
                tag.TASK: vector.task or "",
                tag.BASE_URI: lineage[conf_keys.BASE_URI],
                tag.BASE_FINGERPRINT: vector.base_fingerprint,
                tag.FINETUNED_URI: recorded.get(tag.FINETUNED_URI) or recorded.get(conf_keys.FINETUNED_URI, ""),
                tag.FINGERPRINT: conf[conf_keys.FINGERPRINT],
                tag.NUM_PARAMETERS: conf[conf_keys.NUM_PARAMETERS],
                tag.L2_NORM: _fmt(conf[conf_keys.L2_NORM]),
                tag.COMPRESSED_FROM: source.canonical,
                tag.SOURCE_FINGERPRINT: source.fingerprint,
                tag.LAYOUT: layout,
                tag.LAYOUT_PARAMS: json.dumps(result.settings, sort_keys=True),
                tag.STORED_BYTES: result.stored_bytes,
                tag.DENSE_BYTES: result.dense_bytes,
            }
            MlflowClient().set_logged_model_tags(info.model_id, {k: str(v) for k, v in tags.items()})
            setting = ", ".join(f"{k} {v:g}" for k, v in result.settings.items())
            description = "\n".join([
                f"**Compressed task vector** for task {md_code(vector.task or '?')}: `{layout}`" + (f" ({setting})" if setting else "")
                + f" of {md_code(source.canonical)}: {smaller_by(result.stored_bytes, result.dense_bytes)} (against the dense vector).",
                "",
                "| role | reference | fingerprint |",
                "|---|---|---|",
                f"| compressed from | {md_code(source.canonical)} | `{source.fingerprint[:16]}` |",
                f"| task vector (densified) | this version | `{conf[conf_keys.FINGERPRINT][:16]}` |",
                "",
                f"{result.stored_bytes} bytes stored for {result.dense_bytes} dense; {conf[conf_keys.NUM_PARAMETERS]} parameters in {conf[conf_keys.NUM_TENSORS]} tensors.",
            ])
            mv, created = _complete_version(finishing, name, info, run.info.run_id, tags, description, alias, output=output, noun="compressed vector")
    _registration_done(created, run.info.run_id, output, noun="compressed vector")
    return Registered(name, str(mv.version), info.model_uri, info.model_id, run.info.run_id, tags, compression=result)


def _vector_description(vector: TaskVector, base: Resolved, finetuned: Resolved, conf: dict) -> str:
    return "\n".join(
        [
            f"**Task vector** for task {md_code(vector.task or '?')}: fine-tune minus base.",
            "",
            "| role | reference | fingerprint |",
            "|---|---|---|",
            f"| base | {_model_cell(base, base.canonical)} | `{base.fingerprint[:16]}` |",
            f"| fine-tune | {_model_cell(finetuned, finetuned.canonical)} | `{finetuned.fingerprint[:16]}` |",
            f"| task vector | this version | `{conf[conf_keys.FINGERPRINT][:16]}` |",
            "",
            f"{conf[conf_keys.NUM_PARAMETERS]} parameters in {conf[conf_keys.NUM_TENSORS]} tensors, L2 norm {_fmt(conf[conf_keys.L2_NORM])}, dtype {conf[conf_keys.DTYPE]}.",
        ]
    )


def _local_paths(refs) -> list[str]:
    """The references that are paths on this machine: a version naming them is not reproducible elsewhere."""
    return [str(r) for r in refs if is_local(r)]


def _warn_not_reproducible(reg: "Registered", local: list[str]) -> None:
    """One line, once the version exists: which local paths ``verify`` elsewhere cannot fetch."""
    if local:
        more = f" and {len(local) - 1} more" if len(local) > 1 else ""
        warnings.warn(
            f"{reg.version_uri} names local paths ({local[0]}{more}) that verify on another machine cannot fetch "
            f"(tagged {tag.REPRODUCIBLE}=false); register the inputs and use their models:/ URIs to make it reproducible",
            TaskVecWarning,
            stacklevel=3,
        )



@_asks_the_server_first
def register_composite(
    recipe: Recipe,
    name: str,
    alias: str | None = None,
    evaluate: Callable[[object], dict[str, float]] | None = None,
    extra_tags: dict[str, str] | None = None,
    note: str | None = None,
    require_alias: str | None = None,
    output: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    allow_mixed: bool = False,
    threads: int | None = None,
) -> Registered:
    """Compose what ``recipe`` says, log it as a ``checkpoint`` model in a run, register a version.

    ``evaluate(module) -> {metric: value}``, when given, is called on the composite
    (default: the recipe's ``evaluation`` block, with the base and each task's
    fine-tune as references); its metrics go on the run, on the logged model and
    into the version's description. ``extra_tags`` go on the version and the logged
    model; ``note`` is a paragraph of the version's description. ``require_alias``
    adds to the recipe's policy; with ``output`` the composite is also left there
    (composed once; an existing output, or one that is an input, is refused before anything
    is registered). A registered model ``name`` whose versions mlflow-taskvec did not make is
    refused unless ``allow_mixed``. ``threads``: the engine's compute threads (default: the cores).
    """
    check_recipe_device(recipe)
    if output is not None:
        check_output_path(output, overwrite)
    inputs = resolve_inputs(recipe, require_alias)
    inputs.check_same_base()  # before a run is started
    linear = fine_tuning_of(inputs.vectors) == "linear"  # a mix of linear and standard vectors: refused here too
    if output is not None:  # every destination checked before a run is started or anything registered
        refuse_aliasing(output, [r.path for r in (inputs.base, *inputs.vectors)])
    resolved = inputs.canonical()
    base = inputs.base
    architecture, code_paths, signature = _architecture_of(base)
    local_paths = _local_paths(recipe.references)

    # With an output, the temporary folder is beside it, so the registered composite is
    # renamed into place at the end: a failure on the way leaves nothing there. The output
    # is claimed (locked, its state at the start kept) from before the run to that rename.
    scratch = {"prefix": f".{Path(output).name}.partial-{os.getpid()}-", "dir": Path(output).parent} if output is not None else {"prefix": "taskvec-compose-"}
    claimed = OutputClaim(output, overwrite) if output is not None else contextlib.nullcontext()
    finishing = contextlib.ExitStack()  # from the version's creation on, a signal waits for the registration to complete
    # The registration marks its own stages (checks: the CLI); the writes inside it (into tmp, the move to output) none.
    owned = stages_owned_by(REGISTRATION)
    with owned, finishing, claimed as claim, owned_run(None) as run, tempfile.TemporaryDirectory(**scratch) as tmp:
        stage("writing", owner=REGISTRATION)
        mlflow.log_params(_run_params(resolved))
        weights = Path(tmp) / "weights"
        as_adapter = resolved.output_format == "peft"  # one PEFT LoRA adapter, logged with mlflow.transformers
        with inputs.named_as_references():  # the weights' metadata and card record the references, as the tags do
            if as_adapter:
                result = compose_to_adapter(inputs.local(), output=weights, recorded=resolved)
            else:
                result = compose_to(inputs.local(), output=weights, recorded=resolved, threads=threads)
        metrics = {}
        if evaluate is None and resolved.evaluation is not None:
            evaluate = composite_evaluation(inputs).evaluate
        if evaluate is not None:
            # evaluated before anything is logged: a failing evaluator leaves no artifact and no logged model
            state = base_with_adapter(base.path, weights) if as_adapter else flavor.read_state(weights)
            metrics = evaluate(module_builder(base, linear=linear)(state))
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(resolved.as_yaml(), "utf-8")
        mlflow.log_artifact(str(recipe_path))
        input_rows = [
            {"uri": r.canonical, "weight": e.weight, "fingerprint": r.fingerprint} for e, r in zip(resolved.vectors, inputs.vectors)
        ]
        lineage = {
            conf_keys.METHOD: resolved.method,
            conf_keys.SCALE: resolved.scale,
            conf_keys.PARAMS: resolved.params,
            conf_keys.INPUTS: input_rows,
            conf_keys.BASE_URI: base.canonical,
            conf_keys.RECIPE_SHA256: resolved.sha256(),
        }
        if as_adapter:
            info, fingerprint = _log_adapter_composite(base, weights, lineage)
            note = "\n\n".join(filter(None, [_adapter_note(result), note]))
        else:
            if metrics and weights.is_dir():  # the model card gains the metrics before it is logged
                rows = [{"ref": r["uri"], "weight": r["weight"], "fingerprint": r["fingerprint"], "task": e.task} for r, e in zip(input_rows, resolved.vectors)]
                write_model_card(weights, resolved, hub_name_of(base.path) or base.canonical, rows, result, metrics, linear=linear)
            hf_base = base.model_dir if flavor.hf_flavor_of(base.model_dir) else None
            if hf_base is None and (flavor.has_tokenizer(base.path) or (base.model_dir and flavor.has_tokenizer(base.model_dir))) and not flavor.has_tokenizer(weights):
                raise TaskVecError(
                    f"base {base.canonical} has a tokenizer that the composite would not carry: it would tokenize every word to [UNK]"
                )
            info = flavor.log_model(
                weights,
                name="composite",
                factory=architecture.get(conf_keys.FACTORY),
                factory_kwargs=architecture.get(conf_keys.FACTORY_KWARGS),
                code_paths=code_paths,
                lineage=lineage,
                signature=signature,
                hf_base=hf_base,
            )
            fingerprint = result.fingerprint
        if metrics:
            mlflow.log_metrics(metrics, model_id=info.model_id)
        tags = {
            tag.KIND: tag.COMPOSITE,
            tag.METHOD: resolved.method,
            tag.SCALE: _fmt(resolved.scale),
            tag.PARAMS: json.dumps(resolved.params, sort_keys=True),
            tag.INPUTS: json.dumps(input_rows),
            tag.BASE_URI: base.canonical,
            tag.BASE_FINGERPRINT: result.base_fingerprint,
            tag.RECIPE_SHA256: resolved.sha256(),
            tag.FINGERPRINT: fingerprint,
            **({tag.OUTPUT_FORMAT: "peft", tag.ADAPTER_RANK: str(result.r), tag.RELATIVE_ERROR: f"{result.relative_error:.6g}"} if as_adapter else {}),
            **({tag.REPRODUCIBLE: "false"} if local_paths else {}),
            **({tag.FINE_TUNING: "linear"} if linear else {}),
            **(extra_tags or {}),
        }
        MlflowClient().set_logged_model_tags(info.model_id, tags)
        description = composite_description(resolved, base, inputs.vectors, fingerprint, metrics, note, linear=linear)
        move = (lambda: claim.move_into_place(weights)) if claim is not None else None
        mv, created = _complete_version(finishing, name, info, run.info.run_id, tags, description, alias, output=output, move=move, picture=True)
    registered = Registered(name, str(mv.version), info.model_uri, info.model_id, run.info.run_id, tags)
    _warn_not_reproducible(registered, local_paths)
    _registration_done(created, run.info.run_id, output)
    return registered


PEFT_PIP_REQUIREMENTS = ["torch", "transformers", "peft"]
PEFT_COMPONENTS = ("tokenizer", "feature_extractor", "image_processor")  # what log_model takes beside the model


def _log_adapter_composite(base: Resolved, adapter: Path, lineage: dict):
    """Log the merged ``adapter`` as an ``mlflow.transformers`` PEFT model on ``base``: its
    ``peft_adaptor`` folder and the base folder as its reference (``base_model_path``: the base's
    weights are not copied), with the base's tokenizer. Returns the logged model's info and the
    fingerprint a download of it is checked against (the stored adapter's)."""
    import peft
    import transformers

    base_dir = base.path
    task = "feature-extraction"
    components: dict = {}
    flavors = yaml.safe_load((base.model_dir / "MLmodel").read_text("utf-8")).get("flavors", {}) if base.model_dir else {}
    # transformers' and MLflow's advice on loading and logging (warnings, INFO lines, progress bars) left out
    with warnings.catch_warnings(), _without_info("mlflow.transformers"), _without_transformers_bars():
        warnings.simplefilter("ignore")
        if "transformers" in flavors:
            loaded = mlflow.transformers.load_model(str(base.model_dir), return_type="components")
            model = loaded["model"]
            task = flavors["transformers"].get("task") or task
            components = {k: v for k, v in loaded.items() if k in PEFT_COMPONENTS}
        else:
            if not (base_dir / "config.json").is_file():
                raise TaskVecError(f"base {base.canonical} is no Hugging Face model folder (config.json), so a PEFT adapter has no model to wrap")
            model = transformers.AutoModel.from_pretrained(str(base_dir), use_safetensors=True)
            if flavor.has_tokenizer(base_dir):
                components["tokenizer"] = transformers.AutoTokenizer.from_pretrained(str(base_dir))
        if "tokenizer" not in components:
            raise TaskVecError(f"base {base.canonical} has no tokenizer, which an mlflow.transformers PEFT model needs")
        peft_model = peft.PeftModel.from_pretrained(model, str(adapter))
        info = mlflow.transformers.log_model(
            transformers_model={"model": peft_model, **components},
            name="composite",
            task=task,
            base_model_path=str(base_dir),
            metadata={"taskvec": lineage},
            pip_requirements=PEFT_PIP_REQUIREMENTS,
        )
    return info, resolve(info.model_uri, fresh=True).fingerprint


def _adapter_note(result) -> str:
    exact = sum(m.exact for m in result.modules)
    return (
        f"PEFT LoRA adapter (r {result.r}, {len(result.modules)} modules, {exact} of them concatenated exactly); "
        f"largest relative Frobenius error {result.relative_error:.4g}."
    )


def _what_stands(created: list[str], run_id: str, output, finished_first: bool = True, noun: str = "composite") -> str:
    """What a registration that a signal waited for completed (``signals.finish_first``), or,
    with ``finished_first=False``, what a complete one leaves (for a signal in its ``done`` stage)."""
    if not created:
        return f"the registration had not begun; run {run_id} ended FINISHED"
    where = f"; the {noun} stands at {output}" if output is not None else ""
    first = "it finished the registration first: " if finished_first else ""
    return f"{first}{created[0]} is complete and its run {run_id} ended FINISHED{where}"


def _architecture_of(base: Resolved) -> tuple[dict, list[str] | None, object]:
    """The base model's factory, shipped code and signature, which a composite inherits.

    An HF-style base (its folder has config.json, e.g. an ``mlflow.transformers``
    model) needs none: the composite carries the config and loads with AutoModel.
    """
    if (not base.conf or base.model_dir is None) and base.path.is_dir() and (base.path / "config.json").is_file():
        return {}, None, None
    if not base.conf or base.conf.get(conf_keys.KIND) != conf_keys.CHECKPOINT or base.model_dir is None:
        raise TaskVecError(
            f"base {base.canonical} is not a checkpoint-kind taskvec model, so the composite would have no architecture; "
            "register the base with mlflow_taskvec.mlflow.flavor.log_model(..., factory=...) or use an HF-style base with config.json"
        )
    code_dir = base.model_dir / (base.conf.get(conf_keys.CODE) or "code")
    code_paths = sorted(str(p) for p in code_dir.iterdir()) if base.conf.get(conf_keys.CODE) and code_dir.is_dir() else None
    signature = Model.load(str(base.model_dir / "MLmodel")).signature
    return base.conf.get(conf_keys.ARCHITECTURE) or {}, code_paths, signature


def _as_param(value: Coefficient):
    """A number as MLflow logs numbers; a per-layer coefficient as JSON, its globs in order."""
    return json.dumps(value) if isinstance(value, dict) else value


def _run_params(recipe: Recipe) -> dict:
    params = {"method": recipe.method, "scale": _as_param(recipe.scale), "num_inputs": len(recipe.vectors)}
    for i, e in enumerate(recipe.vectors):
        params[f"vectors.{i}.weight"] = _as_param(e.weight)
        params[f"vectors.{i}.uri"] = e.ref
    for k, v in recipe.params.items():
        params[f"params.{k}"] = v
    return params


def composite_description(
    recipe: Recipe, base: Resolved, inputs: list[Resolved], fingerprint: str, metrics: dict, note: str | None = None, linear: bool = False
) -> str:
    lines = [
        f"**Composite** by `{recipe.method}`, scale {_fmt(recipe.scale)}"
        + (f", params {md_code(json.dumps(recipe.params, sort_keys=True))}" if recipe.params else "")
        + ".",
        "",
        "| role | model | version | weight | fingerprint |",
        "|---|---|---|---|---|",
        f"| base | {_model_cell(base)} | {base.version or '-'} | - | `{base.fingerprint[:16]}` |",
    ]
    for e, r in zip(recipe.vectors, inputs):
        role = "task vector" if e.vector is not None else "fine-tune"
        lines.append(f"| {role} | {_model_cell(r)} | {r.version or '-'} | {md_text(_fmt(e.weight))} | `{r.fingerprint[:16]}` |")
    lines += ["", f"Output fingerprint `{fingerprint}`; recipe sha256 `{recipe.sha256()}`."]
    if linear:
        lines += ["", LINEAR_NOTE]
    if note:
        lines += ["", note]
    if metrics:
        lines += ["", _metrics_table(metrics)]
    return "\n".join(lines)


def _metrics_table(metrics: dict[str, float]) -> str:
    """Metrics as a Markdown table: one row per task, one column per metric kind."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        head, _, kind = key.rpartition(".")
        rows.setdefault(head or "-", {})[kind] = value
    kinds = sorted({k for r in rows.values() for k in r}, key=lambda k: (k.split("_")[-1], k.count("_"), k))
    order = sorted(rows, key=lambda t: (t == "mean", t.startswith("control."), t))
    lines = ["| task | " + " | ".join(md_text(k) for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for task in order:
        lines.append(f"| {md_text(task)} | " + " | ".join(_fmt(rows[task][k]) if k in rows[task] else "" for k in kinds) + " |")
    return "\n".join(lines)
