"""The ``mlflow-taskvec`` command line.

Every failure is one sentence on stderr and a non-zero exit (1 for bad input,
2 for bad usage); outputs are written under a temporary name and moved into
place only when complete. Progress bars show on a terminal only.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from mlflow_taskvec import __version__
from mlflow_taskvec.engine.inspect import describe
from mlflow_taskvec.engine.methods import METHODS
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.writer import parse_size
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.recipe import load_recipe, run_recipe
from mlflow_taskvec.references import open_reference


def _fail_cleanly(fn):
    """Turn expected errors into one-line ClickExceptions (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TaskVecError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except Exception as exc:
            mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # loaded only if MLflow was used
            if mlflow_exceptions is None or not isinstance(exc, mlflow_exceptions.MlflowException):
                raise
            from mlflow_taskvec.tracking.server import server_error

            raise click.ClickException(str(server_error(exc, "MLflow failed"))) from None

    return wrapper


def _progress(total: int, label: str, quiet: bool):
    """A tqdm bar on a terminal, nothing otherwise; returns (callback, close)."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="tensor", leave=False, file=sys.stderr)
    return (lambda _name: bar.update(1)), bar.close


def _echo(quiet: bool, text: str = "") -> None:
    if not quiet:
        click.echo(text)


_overwrite = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
_quiet = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
_shards = click.option("--max-shard-size", default=None, help="Write shards of at most this size (e.g. 2GB) plus an index.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="mlflow-taskvec")
def main():
    """Edit models with task arithmetic: extract, compose and inspect task vectors."""
    if not sys.stderr.isatty():  # MLflow's download bars too: quiet when not on a terminal
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


_register = click.option("--register", "register_as", default=None, metavar="NAME", help="Log to MLflow and register a version of this registered model.")
_alias = click.option("--alias", default=None, help="With --register: point this alias at the new version.")

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
@_overwrite
@_quiet
@_fail_cleanly
def extract(base, finetuned, output, task, include, exclude, dtype, allow_nonfinite, max_shard_size, register_as, alias, run_id, overwrite, quiet):
    """Extract the task vector FINETUNED - BASE."""
    if output is None and register_as is None:
        raise click.UsageError("give --output, --register, or both")
    if register_as is not None:
        from mlflow_taskvec.tracking.references import resolve

        base_ref, ft_ref = resolve(base), resolve(finetuned)
        base_ckpt, ft_ckpt = open_reference(base_ref.path), open_reference(ft_ref.path)
    else:
        base_ckpt, ft_ckpt = open_reference(base), open_reference(finetuned)
    vector = TaskVector.extract(base_ckpt, ft_ckpt, include=include or None, exclude=exclude or None, task=task or None)
    if output is None:
        _report_registration(quiet, _register_vector(vector, register_as, base_ref, ft_ref, run_id, alias))
        return
    step, close = _progress(len(vector.names), "extract", quiet)
    try:
        fingerprint = vector.save(
            output, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, allow_nonfinite=allow_nonfinite, progress=step
        )
    finally:
        close()
    _echo(quiet, f"task vector: {output}")
    _echo(quiet, f"tensors: {len(vector.names)}  parameters: {vector.num_parameters}  skipped: {len(vector.skipped)}")
    _echo(quiet, f"base fingerprint: {vector.base_fingerprint}")
    _echo(quiet, f"fingerprint: {fingerprint}")
    if register_as is not None:
        _report_registration(quiet, _register_vector(TaskVector.load(output), register_as, base_ref, ft_ref, run_id, alias))


def _register_vector(vector, name, base_ref, ft_ref, run_id, alias):
    from mlflow_taskvec.tracking.registry import register_task_vector

    return register_task_vector(vector, name, base_ref, ft_ref, run_id=run_id, alias=alias)


def _report_registration(quiet: bool, reg) -> None:
    _echo(quiet, f"registered: {reg.version_uri}  (model {reg.model_uri}, run {reg.run_id})")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="Output path (overrides the recipe's).")
@_shards
@_register
@_alias
@_overwrite
@_quiet
@_fail_cleanly
def compose(recipe, output, max_shard_size, register_as, alias, overwrite, quiet):
    """Compose a model from a YAML merge RECIPE (references may be MLflow URIs)."""
    spec = load_recipe(recipe)
    if max_shard_size is not None:
        parse_size(max_shard_size, "--max-shard-size")
        spec.max_shard_size = max_shard_size
    if register_as is not None:
        from mlflow_taskvec.tracking.registry import register_composite

        reg = register_composite(spec, register_as, alias=alias)
        _echo(quiet, f"method: {spec.method}  scale: {spec.scale}  weights: {[e.weight for e in spec.vectors]}")
        _echo(quiet, f"fingerprint: {reg.tags['taskvec.fingerprint']}")
        _report_registration(quiet, reg)
        if output is None:
            return
    base = open_reference(spec.base, recipe.parent)
    step, close = _progress(len(base.keys()), spec.method, quiet)
    try:
        result = run_recipe(spec, output=output, relative_to=recipe.parent, overwrite=overwrite, progress=step)
    finally:
        close()
    _echo(quiet, f"composite: {result.output}")
    _echo(quiet, f"method: {result.method}  scale: {result.scale}  weights: {result.weights}  params: {json.dumps(result.params)}")
    _echo(quiet, f"tensors: {result.num_tensors}  parameters: {result.num_parameters}  seconds: {result.seconds:.2f}")
    _echo(quiet, f"recipe sha256: {spec.sha256()}")
    _echo(quiet, f"fingerprint: {result.fingerprint}")


@main.command()
@click.argument("ref")
@click.option("--top", default=10, help="How many of the largest tensors (by L2 norm) to list.")
@click.option("--layers", is_flag=True, help="Also list L2 norms per layer.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
@_fail_cleanly
def inspect(ref, top, layers, fmt):
    """Describe a checkpoint or task vector: tensors, parameters, dtypes, fingerprint, norms."""
    d = describe(open_reference(ref))
    if fmt == "json":
        out = {
            "source": d.source,
            "kind": d.kind,
            "fingerprint": d.fingerprint,
            "num_tensors": d.num_tensors,
            "num_parameters": d.num_parameters,
            "dtypes": d.dtypes,
            "l2_norm": d.l2_norm,
            "largest": [{"name": n, "l2_norm": v} for n, v in d.largest(top)],
            "metadata": d.metadata,
        }
        if layers:
            out["layers"] = d.layer_norms()
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"source: {d.source}")
    click.echo(f"kind: {d.kind}")
    for key in ("taskvec.task", "taskvec.base_fingerprint", "taskvec.method", "taskvec.recipe_sha256"):
        if key in d.metadata:
            click.echo(f"{key.removeprefix('taskvec.')}: {d.metadata[key]}")
    click.echo(f"tensors: {d.num_tensors}")
    click.echo(f"parameters: {d.num_parameters}")
    click.echo("dtypes: " + ", ".join(f"{k} ({v})" for k, v in sorted(d.dtypes.items())))
    click.echo(f"fingerprint: {d.fingerprint}")
    click.echo(f"l2 norm: {d.l2_norm:.6g}")
    if top > 0 and d.tensor_norms:
        click.echo(f"largest {min(top, len(d.tensor_norms))} tensors by l2 norm:")
        width = max(len(n) for n, _ in d.largest(top))
        for name, norm in d.largest(top):
            click.echo(f"  {name:<{width}}  {norm:.6g}")
    groups = d.layer_norms()
    if layers:
        click.echo("l2 norm by layer:")
    if layers and groups:
        width = max(len(n) for n in groups)
        for name, norm in groups.items():
            click.echo(f"  {name:<{width}}  {norm:.6g}")


def _render(frame, fmt: str) -> str:
    """A pandas frame as text for people or machines."""
    if fmt == "csv":
        return frame.to_csv(index=True)
    if fmt == "json":
        return frame.to_json(orient="split", indent=2)
    if fmt == "markdown":
        cols = [frame.index.name or ""] + [str(c) for c in frame.columns]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for idx, row in frame.iterrows():
            cells = [str(idx)] + [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    return frame.to_string(float_format=lambda v: f"{v:.4f}")


@main.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--heatmap", type=click.Path(path_type=Path), default=None, help="Write a heatmap PNG here.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown", "json"]), default="table", help="Output format.")
@_fail_cleanly
def similarity(refs, heatmap, fmt):
    """Cosine similarity matrix of task vectors REFS (as in the paper, near 0 for unrelated tasks)."""
    import pandas as pd

    from mlflow_taskvec.engine.inspect import cosine_matrix
    from mlflow_taskvec.references import load_vector

    if len(refs) < 2:
        raise click.UsageError("give at least two task vectors")
    vectors = [load_vector(r) for r in refs]
    labels = [v.task or Path(str(r)).name for v, r in zip(vectors, refs)]
    frame = pd.DataFrame(cosine_matrix(vectors).numpy(), index=pd.Index(labels, name="cosine"), columns=labels)
    click.echo(_render(frame, fmt))
    if heatmap is not None:
        _write_heatmap(frame, heatmap)
        click.echo(f"heatmap: {heatmap}", err=True)


def _write_heatmap(frame, path: Path) -> None:
    """Save the matrix as a PNG (and log it to the active MLflow run, if any)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frame)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1 + 0.8 * n))
    im = ax.imshow(frame.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), frame.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), frame.index)
    for i in range(n):
        for j in range(n):
            value = frame.iat[i, j]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    if os.environ.get("MLFLOW_RUN_ID"):
        import mlflow

        with mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"]):
            mlflow.log_artifact(str(path))


@main.command()
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown", "json"]), default="table", help="Output format.")
@_fail_cleanly
def report(name, fmt):
    """Composites registered under NAME (a registered model), with method, weights, scale and metrics."""
    from mlflow_taskvec.tracking.report import composites_frame

    click.echo(_render(composites_frame(name), fmt))


@main.command("methods")
def list_methods():
    """List the merge methods and their parameters."""
    for m in METHODS.values():
        params = ", ".join(sorted(m.params)) or "none"
        click.echo(f"{m.name}: {m.description} (params: {params})")


if __name__ == "__main__":
    main()
