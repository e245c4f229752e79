"""The ``mlflow-taskvec`` command line.

Every failure is one sentence on stderr and a non-zero exit (1 for bad input,
2 for bad usage); outputs are written under a temporary name and moved into
place only when complete. Progress bars show on a terminal only.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from mlflow_taskvec import __version__
from mlflow_taskvec.errors import ParameterError, TaskVecError, TaskVecWarning
from mlflow_taskvec.mlflow.patience import bounded_waiting
from mlflow_taskvec.signals import Terminated, begin_command, terminate_like_interrupt, what_stands
from mlflow_taskvec.tables import render_table

# Each command imports what it uses when it runs: `--version` and `--help` need no
# torch, and local work never imports MLflow (tests/test_startup.py checks both).


def _import_torch_first() -> None:
    """Every command computes with torch: import it before the rest and move the objects its
    import made (about 170,000) into the collector's permanent generation (``gc.freeze``). Left
    where they are, the first full collection that the imports after torch trigger (the recipe's
    pydantic schema, the engine, MLflow) traverses them all, about 0.08 s of CPU of a local
    compose's start, and so do the interpreter's collections at exit (0.25 s; docs/benchmarks.md
    "Start-up"). They are modules' objects and live as long as the process anyway. Only where
    this command imports torch: a process that had it already (the Python API, tests calling
    ``main``) keeps its collector as it was."""
    if "torch" in sys.modules:
        return
    import torch  # noqa: F401  (third-party; the command below imports it anyway)

    gc.freeze()


def _fail_cleanly(fn):
    """Turn expected errors into one-line ClickExceptions (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            begin_command()  # the command's first stage: checks
            _import_torch_first()
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP: the cleanup has run on the way here
            stopped = exc if isinstance(exc, Terminated) else Terminated(signal.SIGINT)
            what = stopped.stands or what_stands() or "temporary files were removed and no output was written"
            click.echo(f"Error: {stopped}; {what}", err=True)
            # Every cleanup ran while the exception unwound (partials removed, a run ended FAILED).
            # Leave without the interpreter's finalization: a signal that landed while native
            # threads (torch's, the compute pool's) were being set up or torn down can make
            # their destructors abort the process ("terminate called without an active exception").
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stopped.exit_code)
        except ParameterError as exc:
            raise click.ClickException(_as_option(exc)) from None
        except TaskVecError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except Exception as exc:
            mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # loaded only if MLflow was used
            if mlflow_exceptions is None or not isinstance(exc, mlflow_exceptions.MlflowException):
                raise
            from mlflow_taskvec.mlflow.server import server_error

            raise click.ClickException(str(server_error(exc, "MLflow failed"))) from None

    return wrapper


def _as_option(exc: ParameterError) -> str:
    """A library parameter's error worded with the command's option for it (``rank`` -> ``--rank``)."""
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx is not None else ():
        if isinstance(param, click.Option) and param.name == exc.param:
            return exc.worded(max(param.opts, key=len))
    return str(exc)


def _echo(quiet: bool, text: str = "") -> None:
    if not quiet:
        click.echo(text)


_overwrite = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
_quiet = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
_shards = click.option("--max-shard-size", default=None, help="Write shards of at most this size (e.g. 2GB) plus an index.")
_threads = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="Compute threads (default: the machine's cores); the output is the same bits for any number.")
_device = click.option("--device", default=None, callback=lambda _c, _p, v: v or None,
                       help="Compute on cpu, cuda, cuda:N or auto (default: the recipe's, else the streaming CPU executor).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="mlflow-taskvec")
def main():
    """Edit models with task arithmetic: extract, compose and inspect task vectors."""
    if not sys.stderr.isatty():  # MLflow's download bars only on a terminal: errors stay one line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not sys.stdout.isatty():  # MLflow's "View run ... at" links (a tracking server's) only on a terminal: stdout stays ours
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    ctx = click.get_current_context()
    ctx.with_resource(terminate_like_interrupt())
    ctx.with_resource(_warnings_as_lines())
    ctx.with_resource(bounded_waiting(_warn))


def _warn(line) -> None:
    """The one way a warning is printed: one ``Warning: ...`` line on stderr."""
    click.echo(f"Warning: {line}", err=True)


@contextlib.contextmanager
def _warnings_as_lines():
    """Our warnings as one ``Warning: ...`` line on stderr (others as Python prints them)."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, TaskVecWarning):
            _warn(message)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


_register = click.option("--register", "register_as", default=None, metavar="NAME", help="Log to MLflow and register a version of this registered model.")
_alias = click.option("--alias", default=None, help="With --register: point this alias at the new version.")
_allow_mixed = click.option("--allow-mixed", is_flag=True, help="With --register: add to a registered model even if it holds versions mlflow-taskvec did not make.")

REF_HELP = "a local path, models:/name/version, models:/name@alias, models:/<model_id> or runs:/<run_id>/path"


@main.command()
@click.option("--base", required=True, help=f"Base (pre-trained) checkpoint: {REF_HELP}.")
@click.option("--finetuned", required=True, help="Fine-tuned checkpoint of the same architecture (same kinds of reference).")
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path), help="Where to write the task vector (optional with --register).")
@click.option("--task", default=None, help="Task name recorded in the vector's metadata.")
@click.option("--include", multiple=True, help="Glob of tensor names to keep (repeatable).")
@click.option("--exclude", multiple=True, help="Glob of tensor names to leave out (repeatable).")
@click.option("--dtype", default=None, help="Storage dtype (default: the base's, float32 for 16-bit bases).")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf in the inputs.")
@_shards
@_register
@_alias
@click.option("--run-id", default=None, help="With --register: the run to log the vector in (default: the fine-tune's run).")
@_allow_mixed
@_overwrite
@_quiet
@_device
@_threads
@_fail_cleanly
def extract(base, finetuned, output, task, include, exclude, dtype, allow_nonfinite, max_shard_size, register_as, alias, run_id, allow_mixed, overwrite, quiet, device,
            threads):
    """Extract the task vector FINETUNED - BASE."""
    from mlflow_taskvec.mlflow.workflows import extract_vector

    if output is None and register_as is None:
        raise click.UsageError("give --output, --register, or both")
    result = extract_vector(
        base, finetuned, output, register_as, include=include, exclude=exclude, task=task, dtype=dtype, max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite, run_id=run_id, alias=alias, allow_mixed=allow_mixed, overwrite=overwrite, device=device, threads=threads, quiet=quiet,
    )
    _print_lines(quiet, result.lines())


def _print_lines(quiet: bool, lines) -> None:
    for line in lines:
        _echo(quiet, line)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="Output path (overrides the recipe's).")
@_shards
@_register
@_alias
@click.option("--require-alias", default=None, metavar="ALIAS", help="Refuse inputs whose registered version does not carry ALIAS (on top of the recipe's policy).")
@_allow_mixed
@click.option("--format", "output_format", type=click.Choice(["safetensors", "peft"]), default=None,
              help="peft: write one PEFT LoRA adapter, never the dense model (default: the recipe's output_format, else the dense model).")
@click.option("--rank", type=int, default=None, help="With --format peft: the rank of every merged module (default: the sum of the inputs' ranks).")
@click.option("--energy", type=float, default=None, help="With --format peft: per module, the smallest rank keeping this share of its squared Frobenius norm.")
@click.option("--svd", type=click.Choice(["exact", "randomized"]), default=None,
              help="With --format peft: how modules are cut to a rank (default: the recipe's output_svd, else exact; randomized is faster and changes bits).")
@_overwrite
@_quiet
@_device
@_threads
@_fail_cleanly
def compose(recipe, output, max_shard_size, register_as, alias, require_alias, allow_mixed, output_format, rank, energy, svd, overwrite, quiet, device, threads):
    """Compose a model from a YAML merge RECIPE (references may be MLflow URIs)."""
    from mlflow_taskvec.engine.writer import parse_size
    from mlflow_taskvec.mlflow.workflows import compose_recipe
    from mlflow_taskvec.recipe import load_recipe

    spec = load_recipe(recipe)
    changes = {key: value for key, value in (("output_format", output_format), ("device", device), ("max_shard_size", max_shard_size)) if value is not None}
    if max_shard_size is not None:
        parse_size(max_shard_size, "--max-shard-size")
    if rank is not None or energy is not None or svd is not None:
        if changes.get("output_format", spec.output_format) != "peft":
            raise click.UsageError("--rank, --energy and --svd apply to --format peft" if svd is not None else "--rank and --energy apply to --format peft")
        from mlflow_taskvec.engine.adapter_merge import check_rank_settings

        if rank is not None or energy is not None:  # together they replace the recipe's (None: not set)
            changes.update(output_rank=rank, output_energy=energy)
        if svd is not None:
            changes["output_svd"] = svd
        settings = {key: changes.get(key, getattr(spec, key)) for key in ("output_rank", "output_energy", "output_svd")}
        check_rank_settings(settings["output_rank"], settings["output_energy"], settings["output_svd"] or "exact")
    if changes:
        spec = spec.derive(f"{recipe} (with the command's options)", **changes)
    result = compose_recipe(
        spec, output, register_as, alias=alias, require_alias=require_alias, allow_mixed=allow_mixed, overwrite=overwrite, threads=threads,
        quiet=quiet,
    )
    _print_lines(quiet, result.lines())


@main.command()
@click.argument("ref")
@click.option("--format", "layout", type=click.Choice(["sparse", "bitdelta", "lowrank"]), required=True, help="sparse: top-k indices and values; bitdelta: sign bits and one scale per matrix; lowrank: truncated SVD factors per matrix.")
@click.option("--density", type=float, default=None, help="sparse: fraction of entries kept; lowrank: fraction of the dense size.")
@click.option("--rank", type=int, default=None, help="lowrank: the rank of every matrix.")
@click.option("--energy", type=float, default=None, help="lowrank: the fraction of each matrix's squared singular values kept.")
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path), help="Where to write the compressed vector (optional with --register).")
@click.option("--base", default=None, help="The base of a PEFT LoRA adapter REF (default: its base_model_name_or_path, if a local folder).")
@_register
@_alias
@_allow_mixed
@_overwrite
@_quiet
@_device
@_fail_cleanly
def compress(ref, layout, density, rank, energy, output, base, register_as, alias, allow_mixed, overwrite, quiet, device):
    """Store the task vector REF in a smaller layout (composed like any task vector)."""
    from mlflow_taskvec.mlflow.workflows import compress_vector

    if output is None and register_as is None:
        raise click.UsageError("give --output, --register, or both")
    result = compress_vector(
        ref, layout, output, register_as, density=density, rank=rank, energy=energy, base=base, alias=alias, allow_mixed=allow_mixed,
        overwrite=overwrite, device=device, quiet=quiet,
    )
    _print_lines(quiet, result.lines())


def _unset_if_empty(_ctx, _param, value):
    """MLproject passes unset string parameters as ''."""
    return value or None


class _Count(click.ParamType):
    """A positive integer; '30.0' too (MLproject has float parameters, not integers);
    '' for unset (an MLproject parameter's empty default)."""

    name = "count"

    def convert(self, value, param, ctx):
        if value == "":
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if not number.is_integer() or number < 1:
            self.fail(f"{value!r} is not a positive whole number", param, ctx)
        return int(number)


@main.command("search")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--strategy", type=click.Choice(["grid", "optuna", "adamerging", ""]), default=None, callback=_unset_if_empty, help="Override search.strategy (default: grid).")
@click.option("--objective", default=None, callback=_unset_if_empty, help="Override search.objective: auto, mean_normalized, negation, analogy, or a metric name.")
@click.option("--trials", type=_Count(), default=None, help="optuna: trials for this worker (default: search.trials).")
@click.option("--storage", default=None, callback=_unset_if_empty, help="optuna: RDB storage URL shared by several workers (e.g. postgresql://host/db).")
@click.option("--study-name", default=None, callback=_unset_if_empty, help="optuna: the study's name in the storage.")
@click.option("--memory", type=click.Choice(["auto", "memory", "streamed"]), default="auto", help="Compose candidates in memory, or through a temporary folder.")
@click.option("--output-recipe", type=click.Path(path_type=Path), default=None, help="Write the winning recipe (YAML) here.")
@click.option("--overwrite", is_flag=True, help="Replace the --output-recipe file if it exists.")
@_register
@_alias
@_allow_mixed
@_quiet
@_device
@_fail_cleanly
def search_command(recipe, strategy, objective, trials, storage, study_name, memory, output_recipe, overwrite, register_as, alias, allow_mixed, quiet, device):
    """Search a RECIPE's coefficients on a validation split; evaluate the best on the test split.

    The recipe needs an `evaluation` block; its optional `search` block sets the
    strategy (default: the paper's grid over the scale, 0.0 to 1.0 step 0.05).
    Each candidate is a child run; the table and a plot are logged on the search's run.
    """
    from mlflow_taskvec.mlflow.search import search_recipe

    result = search_recipe(
        recipe, strategy=strategy, objective=objective, trials=trials, storage=storage, study_name=study_name, memory=memory,
        output_recipe=output_recipe, overwrite=overwrite, register_as=register_as, alias=alias, allow_mixed=allow_mixed, quiet=quiet,
        device=device,
    )
    _print_lines(quiet, result.lines())


@main.command("leaderboard")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--methods", required=True, help="Comma-separated merge methods to rank, e.g. task_arithmetic,ties,tsv_m,iso_c,adamerging.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table", help="How to print the table.")
@click.option("--trials", type=_Count(), default=None, help="optuna trials for each method with searchable parameters (default: search.trials).")
@click.option("--memory", type=click.Choice(["auto", "memory", "streamed"]), default="auto", help="Compose candidates in memory, or through a temporary folder.")
@click.option("--register", "register_as", default=None, metavar="NAME", callback=_unset_if_empty, help="Register the best method's winner as a version of NAME.")
@click.option("--register-each", is_flag=True, help="With --register: register every method's winner as a version of NAME (alias 'best' on the best).")
@_allow_mixed
@_quiet
@_fail_cleanly
def leaderboard_command(recipe, methods, fmt, trials, memory, register_as, register_each, allow_mixed, quiet):
    """Rank merge METHODS on a RECIPE's inputs: per method a child run searches its coefficients on
    the validation split and evaluates the winner on the test split; the table and a bar chart are
    logged on the parent run."""
    from mlflow_taskvec.mlflow.leaderboard import leaderboard_recipe, parse_methods

    names = parse_methods(methods)  # before the recipe is read or a run started
    if register_each and register_as is None:
        raise click.UsageError("--register-each needs --register NAME")
    board = leaderboard_recipe(recipe, names, trials, register_as=register_as, register_each=register_each, memory=memory, quiet=quiet,
                               allow_mixed=allow_mixed)
    click.echo(board.render(fmt))
    if not quiet:  # the table is what stdout carries (csv and json stay parseable)
        for line in board.lines():
            click.echo(line, err=True)


_adapter_base = click.option("--base", default=None, help="The base of a PEFT LoRA adapter (default: its base_model_name_or_path, if a local folder).")


@main.command()
@click.argument("ref")
@click.option("--top", default=10, help="How many of the largest tensors (by L2 norm) to list.")
@click.option("--layers", is_flag=True, help="Also list L2 norms per layer.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
@_adapter_base
@_fail_cleanly
def inspect(ref, top, layers, fmt, base):
    """Describe a checkpoint or task vector: tensors, parameters, dtypes, fingerprint, norms."""
    from mlflow_taskvec.engine.describe import describe
    from mlflow_taskvec.references import open_reference

    d = describe(open_reference(ref, base=open_reference(base) if base else None))
    click.echo(json.dumps(d.as_dict(top, layers), indent=2) if fmt == "json" else "\n".join(d.lines(top, layers)))


@main.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--heatmap", type=click.Path(path_type=Path), default=None, help="Write a heatmap PNG here.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown", "json"]), default="table", help="Output format.")
@_adapter_base
@click.option("--overwrite", is_flag=True, help="Replace the --heatmap file if it exists.")
@_fail_cleanly
def similarity(refs, heatmap, fmt, base, overwrite):
    """Cosine similarity matrix of task vectors REFS (as in the paper, near 0 for unrelated tasks)."""
    from mlflow_taskvec.mlflow.workflows import compare_vectors

    if len(refs) < 2:
        raise click.UsageError("give at least two task vectors")
    result = compare_vectors(refs, base, heatmap, overwrite)
    click.echo(result.render(fmt))
    for line in result.lines():
        click.echo(line, err=True)


@main.command()
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown", "json"]), default="table", help="Output format.")
@click.option("--metric", "metrics", multiple=True, help="Only metrics matching this glob, e.g. 'mean.*' (repeatable; default: all).")
@_fail_cleanly
def report(name, fmt, metrics):
    """Composites registered under NAME (a registered model, or else an experiment), with method, weights, scale and metrics."""
    from mlflow_taskvec.mlflow.report import composites_frame

    click.echo(render_table(composites_frame(name, list(metrics)), fmt))


@main.command("methods")
def list_methods():
    """List the merge methods: a one-line summary, the paper's arXiv id and the parameters."""
    from mlflow_taskvec.engine.methods import METHODS

    for m in METHODS.values():
        params = ", ".join(sorted(m.param_names)) or "none"
        paper = f"arXiv {m.paper}" if m.paper else "no arXiv paper"
        click.echo(f"{m.name}: {m.summary} ({paper}; params: {params})")


# -- governance: approve, lineage, verify (mlflow_taskvec.mlflow.approval, .lineage, .verify) ---------------


@main.command()
@click.argument("ref")
@click.option("--alias", required=True, help="The alias to point at the version, e.g. approved.")
@click.option("--note", default=None, help="Why it is approved (recorded as a version tag).")
@_fail_cleanly
def approve(ref, alias, note):
    """Approve REF (models:/name/version or models:/name@alias): point ALIAS at it and record who and when."""
    from mlflow_taskvec.mlflow.approval import approve as approve_version

    _print_lines(False, approve_version(ref, alias, note).lines())


@main.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "dot", "png"]), default="text",
              help="A tree for people, JSON for scripts, Graphviz dot, or a PNG picture (needs --output).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="Write it to this file instead of stdout.")
@click.option("--overwrite", is_flag=True, help="Replace the --output file if it exists.")
@_fail_cleanly
def lineage(ref, fmt, output, overwrite):
    """What REF (a registered version) is made of: composite -> inputs -> task vectors -> fine-tunes and base."""
    from mlflow_taskvec.mlflow.workflows import show_lineage

    if fmt == "png" and output is None:
        raise click.UsageError("--format png writes a picture: give --output FILE.png")
    shown = show_lineage(ref, fmt, output, overwrite)
    if shown.text is not None:
        click.echo(shown.text)
    for line in shown.lines():
        click.echo(line, err=True)


@main.command()
@click.argument("ref")
@click.option("--recursive", is_flag=True, help="Also verify every registered composite and task vector REF is made of, down to the fine-tunes.")
@_quiet
@_fail_cleanly
def verify(ref, recursive, quiet):
    """Check that REF (a registered composite or task vector) is untampered and reproducible.

    Downloads the base and every input afresh, checks their fingerprints and the
    recipe's digest against what the version records, recomposes (or re-extracts)
    into a temporary folder and compares fingerprints. Exit 0 and "verified", or
    exit 1 naming the first mismatch. With --recursive, every registered composite
    and task vector REF is made of is verified too, down to the fine-tunes.
    """
    from mlflow_taskvec.mlflow.verify import verify as verify_version
    from mlflow_taskvec.mlflow.verify import verify_recursively

    for result in verify_recursively(ref) if recursive else [verify_version(ref)]:
        _print_lines(False, result.lines(checks=not quiet))


@main.command("export-lora")
@click.argument("ref")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="The adapter folder to write (adapter_config.json + adapter_model.safetensors).")
@click.option("--base", default=None, help="With a composite or fine-tune REF: export REF - BASE. Needed for --modules-to-save, for a PEFT adapter REF and to read a GPT-2-style (Conv1D) layout.")
@click.option("--rank", type=int, default=None, help="The rank of every module.")
@click.option("--energy", type=float, default=None, help="Per module, the smallest rank keeping this share of the delta's squared Frobenius norm (e.g. 0.99).")
@click.option("--modules-to-save", "modules_to_save", multiple=True, metavar="GLOB", help="Modules written whole (base + delta) under modules_to_save, e.g. '*.LayerNorm' (repeatable).")
@click.option("--dtype", default="float32", help="The factors' dtype (float32, float16 or bfloat16).")
@click.option("--base-name", default=None, help="base_model_name_or_path to record (default: the local --base path).")
@_overwrite
@_quiet
@_fail_cleanly
def export_lora_command(ref, output, base, rank, energy, modules_to_save, dtype, base_name, overwrite, quiet):
    """Write a task vector REF (or REF - BASE) as a PEFT LoRA adapter by truncated SVD of each 2-D delta.

    Prints each tensor's rank and relative Frobenius error ||delta - B A|| / ||delta||,
    the total over the whole vector, and what a LoRA adapter cannot hold (1-D tensors
    such as biases and norms, unless their modules go to --modules-to-save).
    """
    from mlflow_taskvec.compose import export_adapter, factor_dtype

    factor = factor_dtype(dtype)  # before the usage check, as ever
    if (rank is None) == (energy is None):
        raise click.UsageError("give exactly one of --rank or --energy")
    result = export_adapter(ref, output, base=base, rank=rank, energy=energy, modules_to_save=modules_to_save, dtype=factor, base_name=base_name,
                            overwrite=overwrite, quiet=quiet)
    _print_lines(quiet, result.lines())


@main.command("disentanglement")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--pair", nargs=2, default=None, metavar="I J", help="Two of the recipe's vectors, by position (0-based) or task.")
@click.option("--all-pairs", is_flag=True, help="Every pair of the recipe's vectors.")
@click.option("--low", type=float, default=-3.0, help="The smallest coefficient of the grid (both axes).")
@click.option("--high", type=float, default=3.0, help="The largest coefficient of the grid.")
@click.option("--step", type=float, default=0.5, help="The grid's step.")
@click.option("--split", default=None, callback=_unset_if_empty, help="Whose inputs are read (default: the evaluation's split).")
@_quiet
@_fail_cleanly
def disentanglement_command(recipe, pair, all_pairs, low, high, step, split, quiet):
    """The weight disentanglement error of pairs of a RECIPE's task vectors (arXiv 2305.12827).

    xi(a1, a2) sums, over the two tasks, the share of the task's inputs (the evaluator's
    unlabeled batches) where base + a1 t_I + a2 t_J predicts otherwise than base + a_k t_k;
    the matrix, a heatmap and the mean inside |a1|, |a2| <= 1 are logged on a new run
    (docs/disentanglement.md).
    """
    from mlflow_taskvec.mlflow.disentanglement import measure
    from mlflow_taskvec.recipe import load_recipe

    result = measure(load_recipe(recipe), pair=tuple(pair) if pair else None, all_pairs=all_pairs, grid=(low, high, step), split=split)
    for r in result.results:
        click.echo(f"{r.labels[0]} + {r.labels[1]}: unit-box mean {r.unit_box_mean:.4f}  grid mean {r.grid_mean:.4f}"
                   f"  ({len(r.alphas)}x{len(r.alphas)} points, {r.inputs[0]} + {r.inputs[1]} inputs)")
    _echo(quiet, f"disentanglement run: {result.run_id}  fine-tuning: {'linear' if result.linear else 'standard'}"
          f"  mean unit-box error: {result.unit_box_mean:.4f}")


if __name__ == "__main__":
    main()
