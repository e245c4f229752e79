"""The one parser of MLflow references, and the lookup of the registered version one names.

- ``models:/name/version`` and ``models:/name@alias``: a registered model version;
- ``models:/<model_id>`` (``m-`` and hex digits): a logged model;
- ``runs:/<run_id>/path``: a run's artifact (or an MLflow 3 model logged in the run).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow.server import server_error

MODELS = "models:/"
RUNS = "runs:/"
MODEL_ID = re.compile(r"^m-[0-9a-f]{8,}$")
_VERSION_FORMS = "use models:/name/version or models:/name@alias"


@dataclass(frozen=True)
class MlflowUri:
    """A parsed ``models:/`` or ``runs:/`` reference."""

    text: str
    kind: str  # version | alias | model_id | run
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    path: str = ""  # inside the run, for runs:/

    @property
    def is_registered_version(self) -> bool:
        return self.kind in ("version", "alias")


def is_mlflow_uri(ref: "str | os.PathLike") -> bool:
    return os.fspath(ref).startswith((MODELS, RUNS))


def parse(ref: "str | os.PathLike") -> MlflowUri:
    """Parse a ``models:/`` or ``runs:/`` reference; raises TaskVecError naming it when it is neither or malformed."""
    text = os.fspath(ref)
    if text.startswith(RUNS):
        run_id, _, path = text[len(RUNS) :].partition("/")
        if not run_id:
            raise TaskVecError(f"{text}: not a runs:/ reference (use runs:/<run_id>/path)")
        return MlflowUri(text, "run", run_id=run_id, path=path)
    if not text.startswith(MODELS):
        raise TaskVecError(f"{text}: not an MLflow reference (use models:/... or runs:/...)")
    rest = text[len(MODELS) :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return MlflowUri(text, "alias", name=name, alias=alias)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version:
            return MlflowUri(text, "version", name=name, version=version)
    elif MODEL_ID.match(rest):
        return MlflowUri(text, "model_id", model_id=rest)
    raise TaskVecError(f"{text}: not a models:/ reference (use models:/name/version, models:/name@alias or models:/<model_id>)")


def parse_version(ref: str) -> MlflowUri:
    """``ref`` parsed, which must name a registered model version (by number or alias)."""
    not_a_version = TaskVecError(f"{ref}: not a registered model version ({_VERSION_FORMS})")
    if not ref.startswith(MODELS):
        raise not_a_version
    try:
        uri = parse(ref)
    except TaskVecError:
        raise not_a_version from None
    if uri.kind == "model_id":
        raise TaskVecError(f"{ref}: a logged model, not a registered model version ({_VERSION_FORMS})")
    return uri


def get_version(ref: str, client: MlflowClient | None = None) -> ModelVersion:
    """The registered model version ``ref`` names (an alias resolved to its version now)."""
    uri = parse_version(ref)
    client = client or MlflowClient()
    try:
        if uri.alias is not None:
            return client.get_model_version_by_alias(uri.name, uri.alias)
        return client.get_model_version(uri.name, uri.version)
    except MlflowException as exc:
        raise server_error(exc, ref) from None
