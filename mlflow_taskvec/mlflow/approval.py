"""Approving registered versions: an alias plus version tags saying who, when and why.

``approve(models:/name/3, "approved")`` points the alias ``approved`` at version 3 and writes on that version:

- ``taskvec.approval.<alias>.by``: who (``MLFLOW_TRACKING_USERNAME``, else the OS user)
- ``taskvec.approval.<alias>.at``: when (UTC, ISO-8601, e.g. ``2026-11-28T12:00:00Z``)
- ``taskvec.approval.<alias>.note``: the optional note
- ``taskvec.approved_by`` / ``taskvec.approved_at``: the latest approval of the version, any alias

A recipe's ``policy: {require_alias: approved}`` (or ``--require-alias``) then refuses an
input unless its registered version carries the alias *now* (``mlflow.inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow import uris
from mlflow_taskvec.mlflow.server import current_user, server_error


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Approval:
    name: str
    version: str
    alias: str
    by: str
    at: str
    note: str | None = None

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def lines(self) -> list[str]:
        """What ``approve`` prints."""
        return [f"approved: {self.version_uri} as {self.alias!r} by {self.by} at {self.at}" + (f" ({self.note})" if self.note else "")]


def approval_tags(alias: str, by: str, at: str, note: str | None) -> dict[str, str]:
    tags = {tag.approval(alias, "by"): by, tag.approval(alias, "at"): at, tag.APPROVED_BY: by, tag.APPROVED_AT: at}
    if note:
        tags[tag.approval(alias, "note")] = note
    return tags


def approvals_of(tags: dict) -> dict[str, dict[str, str]]:
    """``{alias: {"by": ..., "at": ..., "note": ...}}`` from a version's tags."""
    out: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith(tag.APPROVAL_PREFIX):
            alias, _, part = key[len(tag.APPROVAL_PREFIX) :].rpartition(".")
            if alias:
                out.setdefault(alias, {})[part] = value
    return out


def approve(ref: str, alias: str, note: str | None = None) -> Approval:
    """Point ``alias`` at the version ``ref`` names and record who approved it, when, and why.

    The alias is set first (MLflow validates its name); if the tags then cannot be
    written, the alias goes back to where it was, so no approval is half-recorded.
    """
    if not alias or not alias.strip():
        raise TaskVecError("--alias: an alias name cannot be empty")
    uris.parse_version(ref)  # refuse what is not a registry reference before connecting to the store
    client = MlflowClient()
    mv = uris.get_version(ref, client)
    name, version = mv.name, str(mv.version)
    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    by, at = current_user(), utc_now()
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise server_error(exc, f"{ref}: alias {alias!r}") from None
    try:
        for key, value in approval_tags(alias, by, at, note).items():
            client.set_model_version_tag(name, version, key, value)
        if not note and tag.approval(alias, "note") in (mv.tags or {}):
            client.delete_model_version_tag(name, version, tag.approval(alias, "note"))  # an older approval's note
    except MlflowException as exc:
        try:
            if previous is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, previous)
        except MlflowException:
            pass
        raise server_error(exc, f"{ref}: recording the approval") from None
    return Approval(name, version, alias, by, at, note or None)
