"""A recipe's inputs, resolved for the MLflow layer: the approval-policy gate, then every
reference resolved to a verified local checkpoint.

``resolve_inputs`` is the one place the policy is checked: the recipe's own
``policy.require_alias`` and a command's ``--require-alias``, before anything is
downloaded. Everything that composes, evaluates or registers from a recipe with MLflow
references starts here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from mlflow_taskvec import compose
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import flavor_conf as conf_keys
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow import uris
from mlflow_taskvec.mlflow.downloads import Resolved, resolve
from mlflow_taskvec.recipe import Recipe
from mlflow_taskvec.references import absolute


def enforce_policy(recipe: Recipe, require_alias: str) -> None:
    """Refuse the first input of ``recipe`` whose registered version does not carry ``require_alias``.

    Reads the registry only: nothing is downloaded, so a refusal is quick.
    """
    if not require_alias or not require_alias.strip():
        raise TaskVecError("require_alias: an alias name cannot be empty")
    client = None  # made on first use: a refusal of a local input touches no store
    for i, entry in enumerate(recipe.vectors):
        ref = entry.ref
        what = f"vectors[{i}] ({ref})"
        if not ref.startswith(uris.MODELS):
            raise TaskVecError(f"{what}: not a registered model version, so it cannot carry the alias {require_alias!r} the policy requires")
        client = client or MlflowClient()
        try:
            mv = uris.get_version(ref, client)
        except TaskVecError as exc:
            raise TaskVecError(f"vectors[{i}]: {exc}") from None
        if require_alias not in (mv.aliases or []):
            raise TaskVecError(
                f"{what}: version {mv.version} of {mv.name!r} does not carry the alias {require_alias!r} the policy requires "
                f"(approve it with: mlflow-taskvec approve models:/{mv.name}/{mv.version} --alias {require_alias})"
            )


def required_aliases(recipe: Recipe, require_alias: str | None = None) -> list[str]:
    """The aliases every input must carry: the recipe's policy, plus a command's ``--require-alias``."""
    aliases = [recipe.policy.require_alias] if recipe.policy is not None else []
    if require_alias is not None:
        if not require_alias.strip():
            raise TaskVecError("--require-alias: an alias name cannot be empty")
        aliases.append(require_alias)
    return aliases


@dataclass
class Inputs:
    """A recipe with its base and inputs resolved (in the order of ``recipe.vectors``)."""

    recipe: Recipe
    base: Resolved
    vectors: list[Resolved]

    def canonical(self) -> Recipe:
        """The recipe with every reference in its immutable form (aliases replaced by versions); no output."""
        data = self.recipe.model_dump()
        data["base"] = self.base.canonical
        for entry, res in zip(data["vectors"], self.vectors):
            entry["vector" if entry.get("vector") is not None else "finetuned"] = res.canonical
        data["output"] = None
        return Recipe.model_validate(data)

    def local(self) -> Recipe:
        """The canonical recipe with every reference replaced by its local path, ready to compose.

        Its policy, already enforced on the real references, is dropped: local paths carry no aliases.
        """
        canonical = self.canonical()
        local = canonical.model_copy(update={"base": str(self.base.path), "policy": None})
        local.vectors = [
            e.model_copy(update={("vector" if e.vector is not None else "finetuned"): str(r.path)}) for e, r in zip(canonical.vectors, self.vectors)
        ]
        return local

    def named_as_references(self) -> AbstractContextManager[None]:
        """Errors and warnings while the local copies are read name each input by its reference
        (``named_as_references`` below)."""
        return named_as_references(self.base, *self.vectors)

    def check_same_base(self) -> None:
        """Refuse an input that is not a task vector, or comes from another base, naming it as the recipe does."""
        for i, (entry, res) in enumerate(zip(self.recipe.vectors, self.vectors)):
            kind = (res.conf or {}).get(conf_keys.KIND)
            if entry.vector is not None and kind not in (None, conf_keys.TASK_VECTOR):
                raise TaskVecError(f"vectors[{i}]: {res.canonical} is a {kind} model, not a task vector")
        local = self.local()
        with self.named_as_references():
            vectors = compose.vectors_of(local, compose.open_base(local))
        compose.check_same_base(self.recipe, self.base.fingerprint, [v.base_fingerprint for v in vectors])


@contextmanager
def named_as_references(*resolved: Resolved) -> Iterator[None]:
    """Errors raised and warnings given while the local copies of ``resolved`` are read (a NaN, a
    bad tensor, an all-zero vector) name each by its reference, not by its path in the download
    cache, which the user never gave. The warnings are held until the block ends, then given again."""
    by_length = sorted(resolved, key=lambda r: len(str(r.path)), reverse=True)

    def as_references(text: str) -> str:
        for res in by_length:
            text = text.replace(str(res.path), res.canonical)
        return text

    held: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as given:
            try:
                yield
            except TaskVecError as exc:
                message = as_references(str(exc))
                if message == str(exc):
                    raise
                raise TaskVecError(message) from None
            finally:
                held = list(given)
    finally:
        for w in held:
            message = w.message
            if isinstance(message, Warning) and (renamed := as_references(str(message))) != str(message):
                message = type(message)(renamed)
            warnings.warn_explicit(message, w.category, w.filename, w.lineno, source=w.source)


def resolve_ref(ref: str, recipe: Recipe, what: str) -> Resolved:
    """One reference of ``recipe`` (relative paths against its folder), errors prefixed with ``what``."""
    try:
        return resolve(absolute(ref, recipe.source_dir))
    except TaskVecError as exc:
        raise TaskVecError(f"{what}: {exc}") from None


def resolve_inputs(recipe: Recipe, require_alias: str | None = None) -> Inputs:
    """Check the policy, then resolve the recipe's base and inputs (downloads cached and verified)."""
    for alias in required_aliases(recipe, require_alias):
        enforce_policy(recipe, alias)
    base = resolve_ref(recipe.base, recipe, "base")
    vectors = [resolve_ref(e.ref, recipe, f"vectors[{i}]") for i, e in enumerate(recipe.vectors)]
    return Inputs(recipe, base, vectors)
