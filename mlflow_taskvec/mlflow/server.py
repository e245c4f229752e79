"""Talking to a tracking server: what it refused, in one sentence, and asking before acting.

MLflow reports a refusal as ``API request to endpoint /api/2.0/mlflow/runs/create
failed with error code 403 != 200. Response body: 'Permission denied'``; users
should read who may not do what instead. ``check_can_register`` asks a
basic-auth server for the user's own permission on a registered model before
anything is written, so a refused registration starts no run at all.
"""

from __future__ import annotations

import getpass
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import requests
from mlflow.exceptions import MlflowException

from mlflow_taskvec.errors import TaskVecError

# Endpoint fragment -> what the request was trying to do (first match wins).
_ACTIONS = (
    ("/model-versions/create", "register versions of model {name}"),
    ("/registered-models/create", "create registered model {name}"),
    ("/registered-models/alias", "set aliases of model {name}"),
    ("/model-versions/", "change versions of model {name}"),
    ("/registered-models/", "change registered model {name}"),
    ("/runs/create", "create runs in experiment {experiment}"),
    ("/runs/", "update runs in experiment {experiment}"),
    ("/logged-models", "log models in experiment {experiment}"),
    ("mlflow-artifacts", "upload artifacts to experiment {experiment}"),
)
_ENDPOINT = re.compile(r"endpoint (\S+)")
_UPDATE_PERMISSIONS = {"EDIT", "MANAGE"}


def current_user() -> str:
    """Who is acting: the MLflow user (``MLFLOW_TRACKING_USERNAME``), else the OS user."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        return "unknown"


def _experiment() -> str:
    try:
        from mlflow.tracking.fluent import _get_experiment_id

        return repr(str(_get_experiment_id()))
    except Exception:  # only used to word a message
        return "(the active one)"


def _action(endpoint: str, name: str | None) -> str:
    for fragment, action in _ACTIONS:
        if fragment in endpoint:
            return action.format(name=repr(name) if name else "(unnamed)", experiment=_experiment())
    return f"call {endpoint}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    code = getattr(exc, "error_code", None)
    if code and text.startswith(f"{code}: "):  # a tracking server's answer names its error code first: worded as a local store's
        text = text[len(code) + 2 :]
    return text.splitlines()[0] if text else type(exc).__name__


def permission_denied(action: str, why: str = "HTTP 403") -> TaskVecError:
    return TaskVecError(f"permission denied by the tracking server: user {current_user()!r} may not {action} ({why})")


def unanswered(exc: BaseException) -> bool:
    """True when a request failed because the server did not answer or dropped the connection
    (not because it answered with a refusal): nothing later in the command would fare better."""
    if isinstance(exc, requests.exceptions.RequestException):
        return True
    message = _first_line(exc)
    return "failed with exception" in message or "Max retries exceeded" in message


def server_error(exc: MlflowException, what: str, name: str | None = None) -> TaskVecError:
    """One sentence for an MlflowException; ``what`` prefixes it unless it is a refusal
    (e.g. "registering 'x' failed", or the reference being resolved)."""
    message = _first_line(exc)
    match = _ENDPOINT.search(message)
    endpoint = match.group(1) if match else ""
    code = getattr(exc, "error_code", "")
    if code == "PERMISSION_DENIED" or "error code 403" in message:
        return permission_denied(_action(endpoint, name))
    if code == "UNAUTHENTICATED" or "error code 401" in message:
        return TaskVecError(
            f"the tracking server at {mlflow.get_tracking_uri()} rejected the credentials of user {current_user()!r} (HTTP 401); "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if unanswered(exc):
        return TaskVecError(
            f"{what}: the tracking server at {mlflow.get_tracking_uri()} did not answer or dropped the connection "
            f"({'while trying to ' + _action(endpoint, name) if endpoint else message})"
        )
    return TaskVecError(f"{what}: {message}")


@contextmanager
def server_errors(what: str, name: str | None = None) -> Iterator[None]:
    """Turn MlflowExceptions (and broken connections) raised inside into one-line TaskVecErrors."""
    try:
        yield
    except MlflowException as exc:
        raise server_error(exc, what, name) from None
    except requests.exceptions.ConnectionError as exc:
        raise TaskVecError(
            f"{what}: the tracking server at {mlflow.get_tracking_uri()} did not answer or dropped the connection ({_first_line(exc)})"
        ) from None


_ATTEMPT_SECONDS = 5  # the permission lookups are optional: no longer than one bounded attempt (patience.py)


def own_permission(resource_type: str, resource_id: str) -> str | None:
    """The current user's permission on a resource as a basic-auth server reports it.

    None when that cannot be known (no server, no user, no basic-auth app, an admin,
    any error): then the server decides when the request is made.
    """
    uri = mlflow.get_tracking_uri()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not uri.startswith(("http://", "https://")) or not user:
        return None
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        me = http_request(creds, "/api/2.0/mlflow/users/get", "GET", params={"username": user}, max_retries=0, timeout=_ATTEMPT_SECONDS)
        if me.status_code != 200 or me.json().get("user", {}).get("is_admin"):
            return None
        resp = http_request(
            creds,
            "/api/3.0/mlflow/users/permissions/get",
            "GET",
            params={"username": user, "resource_type": resource_type, "resource_id": resource_id},
            max_retries=0,
            timeout=_ATTEMPT_SECONDS,
        )
        return resp.json().get("permission") if resp.status_code == 200 else None
    except Exception:  # the server answers the real request anyway
        return None


def check_can_register(name: str) -> None:
    """Refuse early when the server says the user may not add versions to the existing model ``name``.

    A model that does not exist yet is left to the server: whoever creates it may register.
    """
    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        return
    try:
        model = mlflow.MlflowClient().get_registered_model(name)
    except MlflowException as exc:
        if unanswered(exc):  # a server that does not answer fails the command now, not after every later request
            raise
        return
    permission = own_permission("registered_model", name)
    # The server grants the creator MANAGE just after creating the model; a model made a
    # moment ago by a concurrent run of this same user may not show that grant yet.
    deadline = time.monotonic() + 5
    young = time.time() * 1000 - (model.creation_timestamp or 0) < 60_000
    while young and permission is not None and permission not in _UPDATE_PERMISSIONS and time.monotonic() < deadline:
        time.sleep(0.5)
        permission = own_permission("registered_model", name)
    if permission is not None and permission not in _UPDATE_PERMISSIONS:
        raise permission_denied(f"register versions of model {name!r}", f"its permission on the model is {permission}")
