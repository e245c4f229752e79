"""``extract`` and ``compose`` as one call each, from references to a written (and, if asked,
registered) task vector or composite; each returns one result object with the lines the CLI
prints.

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
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.recipe import Recipe

if TYPE_CHECKING:
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
