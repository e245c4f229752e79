"""The commands that may need MLflow as one call each: ``extract``, ``compose`` and ``compress``,
from references to a written (and, if asked, registered) task vector or composite; ``similarity``
(whose heatmap goes to an ``mlflow run`` step's run) and ``lineage``. Each returns one result
object with the lines the CLI prints.

Local work is done by ``mlflow_taskvec.compose`` alone and never imports MLflow (a local
compose starts in a fraction of the time, tests/test_startup.py): the MLflow modules are
imported below only on the path that needs them, an MLflow reference, a policy or a
registration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_taskvec import compose
from mlflow_taskvec.engine.output import check_output_path, write_text
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import ParameterError
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.recipe import Recipe
from mlflow_taskvec.similarity import Similarity, similarity_of

if TYPE_CHECKING:
    from mlflow_taskvec.mlflow.lineage import Node
    from mlflow_taskvec.mlflow.registry import Registered


@dataclass
class ExtractedAndRegistered:
    """``extract --register``: the task vector written (None when only registered) and its version."""

    extracted: compose.Extracted | None
    registered: "Registered"

    def lines(self) -> list[str]:
        return [*(self.extracted.lines() if self.extracted else []), self.registered.summary()]


@dataclass
class ComposedAndRegistered:
    """``compose --register``: the recipe as registered, the composite also written (or None), the version."""

    recipe: Recipe
    output: Path | None
    registered: "Registered"

    def lines(self) -> list[str]:
        r = self.recipe
        return [
            f"method: {r.method}  scale: {r.scale}  weights: {[e.weight for e in r.vectors]}",
            f"fingerprint: {self.registered.tags[tag.FINGERPRINT]}",
            *([f"composite: {self.output}"] if self.output is not None else []),
            self.registered.summary(),
        ]


def extract_vector(
    base: "str | os.PathLike",
    finetuned: "str | os.PathLike",
    output: "str | os.PathLike | None" = None,
    register_as: str | None = None,
    include=None,
    exclude=None,
    task: str | None = None,
    run_id: str | None = None,
    alias: str | None = None,
    allow_mixed: bool = False,
    **save,
) -> "compose.Extracted | ExtractedAndRegistered":
    """The task vector ``finetuned - base`` written to ``output``, registered as a version of
    ``register_as``, or both (at least one); ``save`` (``dtype``, ``overwrite``, ``quiet``, ...)
    as for ``Extraction.save``. With ``register_as`` the references may be MLflow URIs; the
    destination is checked before anything is written, and the version records the vector
    as written (``TaskVector.load(output)``)."""
    if register_as is None:
        return compose.extract(base, finetuned, include=include, exclude=exclude, task=task).save(output, **save)
    from mlflow_taskvec.mlflow.downloads import resolve
    from mlflow_taskvec.mlflow.inputs import named_as_references
    from mlflow_taskvec.mlflow.registry import check_destination, register_task_vector

    check_destination(register_as, allow_mixed)  # before the output is written
    base_ref, ft_ref = resolve(base), resolve(finetuned)
    with named_as_references(base_ref, ft_ref):
        extraction = compose.extract(base_ref.path, ft_ref.path, include=include, exclude=exclude, task=task)
        extracted = extraction.save(output, **save) if output is not None else None
        vector = TaskVector.load(output) if output is not None else extraction.vector
        registered = register_task_vector(vector, register_as, base_ref, ft_ref, run_id=run_id, alias=alias, allow_mixed=allow_mixed, output=output)
    return ExtractedAndRegistered(extracted, registered)


def compose_recipe(
    recipe: Recipe,
    output: "str | os.PathLike | None" = None,
    register_as: str | None = None,
    alias: str | None = None,
    require_alias: str | None = None,
    allow_mixed: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    quiet: bool = True,
) -> "compose.Composed | ComposedAndRegistered":
    """Compose ``recipe`` into ``output`` (default: the recipe's), as its ``output_format`` says.

    Local references are composed as they are. MLflow references, a policy or
    ``require_alias`` go through the MLflow layer: the policy is checked before anything is
    downloaded, and errors name the inputs as the recipe does. With ``register_as`` the
    composite is registered as a version of that model (and also written to ``output`` or
    the recipe's ``output``, when one is given)."""
    if register_as is not None:
        from mlflow_taskvec.mlflow.registry import register_composite

        if output is None and recipe.output is not None:  # the recipe's output: is written too
            output = compose.output_path(recipe)
        registered = register_composite(
            recipe, register_as, alias=alias, require_alias=require_alias, output=output, overwrite=overwrite, allow_mixed=allow_mixed,
            threads=threads,
        )
        return ComposedAndRegistered(recipe, Path(output) if output is not None else None, registered)
    if not compose.needs_mlflow(recipe, require_alias):
        return compose.compose_recipe(recipe, output=output, overwrite=overwrite, quiet=quiet, threads=threads)
    from mlflow_taskvec.mlflow.inputs import resolve_inputs

    inputs = resolve_inputs(recipe, require_alias)  # the policy first, before anything is downloaded
    with inputs.named_as_references():
        return compose.compose_recipe(inputs.local(), output=output, overwrite=overwrite, quiet=quiet, threads=threads, recorded=recipe)


@dataclass
class CompressedAndRegistered:
    """``compress --register``: the compressed vector (its ``output`` None when only registered) and its version."""

    compressed: compose.Compressed
    registered: "Registered"

    def lines(self) -> list[str]:
        return [*self.compressed.lines(), self.registered.summary()]


def compress_vector(
    ref: "str | os.PathLike",
    layout: str,
    output: "str | os.PathLike | None" = None,
    register_as: str | None = None,
    density: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    base: "str | os.PathLike | None" = None,
    alias: str | None = None,
    allow_mixed: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    quiet: bool = True,
) -> "compose.Compressed | CompressedAndRegistered":
    """The task vector ``ref`` stored in the ``layout`` at ``output``, registered as a version of
    ``register_as``, or both (at least one). Without ``register_as`` the work is local
    (``compose.compress_vector``, no MLflow); with it ``ref`` may be an MLflow URI and the
    version records where it was compressed from (``registry.register_compressed_vector``).
    Either way the settings are checked before anything is read or downloaded."""
    if output is None and register_as is None:
        raise ParameterError("output", "give an output, a registered model to register as, or both")
    settings = dict(density=density, rank=rank, energy=energy)
    if register_as is None:
        return compose.compress_vector(ref, output, layout, base=base, overwrite=overwrite, device=device, quiet=quiet, **settings)
    from mlflow_taskvec.mlflow.registry import register_compressed_vector

    registered = register_compressed_vector(
        ref, register_as, layout, output=output, overwrite=overwrite, alias=alias, device=device, allow_mixed=allow_mixed, base=base, **settings,
    )
    return CompressedAndRegistered(compose.Compressed(Path(output) if output is not None else None, registered.compression), registered)


def compare_vectors(
    refs, base: "str | os.PathLike | None" = None, heatmap: "str | os.PathLike | None" = None, overwrite: bool = False,
) -> Similarity:
    """The cosine-similarity matrix of the task vectors ``refs`` (``similarity.similarity_of``: the
    heatmap path checked before anything is read, then written). Inside an ``mlflow run`` step
    (``MLFLOW_RUN_ID`` set) the heatmap is also logged to that run; MLflow is imported only then."""
    result = similarity_of(refs, base, heatmap, overwrite)
    if heatmap is not None and os.environ.get("MLFLOW_RUN_ID"):
        from mlflow_taskvec.mlflow.runs import log_to_enclosing_run

        log_to_enclosing_run(heatmap)
    return result


LINEAGE_FORMATS = ("text", "json", "dot", "png")


@dataclass
class LineageShown:
    """A lineage tree as ``lineage`` shows it: ``text`` for stdout (None when written to
    ``output``), the picture's size for ``png``."""

    root: "Node"
    fmt: str
    output: Path | None
    text: str | None
    picture_size: tuple[int, int] | None = None

    def lines(self) -> list[str]:
        """What ``mlflow-taskvec lineage`` prints on stderr: the picture it drew."""
        if self.picture_size is None:
            return []
        width, height = self.picture_size
        return [f"lineage picture: {self.output} ({width}x{height} pixels)"]


def show_lineage(ref: str, fmt: str = "text", output: "str | os.PathLike | None" = None, overwrite: bool = False) -> LineageShown:
    """What the registered version ``ref`` is made of (``lineage.lineage``), rendered as ``fmt``
    (a text tree, JSON, Graphviz dot, or a ``png`` picture, which needs ``output``); written to
    ``output`` when given, whose path is checked before anything is fetched."""
    from mlflow_taskvec.mlflow import lineage as lineage_module

    if fmt not in LINEAGE_FORMATS:
        raise ParameterError("fmt", f"{fmt!r} is not one of {', '.join(LINEAGE_FORMATS)}")
    if fmt == "png" and output is None:
        raise ParameterError("output", "a png picture needs an output file")
    what = "lineage picture" if fmt == "png" else "lineage file"
    if output is not None:
        check_output_path(output, overwrite, what=what)  # before anything is fetched
    root = lineage_module.lineage(ref)
    output = Path(output) if output is not None else None
    if fmt == "png":
        from mlflow_taskvec.mlflow.lineage_plot import draw_lineage

        return LineageShown(root, fmt, output, None, draw_lineage(root, output, overwrite=overwrite))
    text = {"text": lineage_module.render_text, "json": lineage_module.render_json, "dot": lineage_module.render_dot}[fmt](root)
    if output is None:
        return LineageShown(root, fmt, None, text)
    write_text(output, text + "\n", what, overwrite=overwrite)
    return LineageShown(root, fmt, output, None)
