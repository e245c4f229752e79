"""How long a command waits for a tracking server that does not answer.

MLflow retries a failed request 7 times with a backoff factor of 2 and waits up to
120 s for each answer, so a dead or unreachable server hangs a command for minutes
without a word. Unless the user chose MLflow's own settings
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``; when any is set, all are left as they are), a command
uses bounded ones: 1 retry, 5 s per attempt, at most 11 s for a request (with MLflow's
jitter of up to 1 s before the retry), so that the whole command, from its start (the
interpreter and its imports, several seconds on a busy machine) to its exit, fails in
under 30 s (a request the server did not answer is not followed by others:
``server.unanswered``). Either way one line is printed when a request to the server is
first retried.

Nothing here imports MLflow: the front end sets this up before MLflow is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

BOUNDED = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
# MLflow's defaults, for the estimate of how long it may take when the user set only some.
_MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 7, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 2, "MLFLOW_HTTP_REQUEST_TIMEOUT": 120,
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 1.0,
}
_RETRY_LOGGER = "urllib3.connectionpool"  # logs "Retrying (Retry(total=...)) after connection broken by ..."


def longest_wait_seconds(env: dict | None = None) -> float:
    """At most how long one request waits on a server that never answers, under ``env``'s settings."""
    env = os.environ if env is None else env

    def setting(key: str) -> float:
        try:
            return float(env[key])
        except (KeyError, ValueError):
            return float(_MLFLOW_DEFAULTS[key])

    retries, factor, timeout, jitter = (setting(k) for k in _MLFLOW_DEFAULTS)
    # urllib3 sleeps factor * 2**(n - 1) before retry n >= 2 (nothing before the first), and MLflow
    # adds up to `jitter` s before every retry; capped at 120 s each.
    backoff = sum(min(120.0, (factor * 2 ** (n - 1) if n >= 2 else 0.0) + jitter) for n in range(1, int(retries) + 1))
    return (retries + 1) * timeout + backoff


class _FirstRetry(logging.Handler):
    def __init__(self, say: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self._say = say
        self._said = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._said or not record.getMessage().startswith("Retrying"):
            return
        self._said = True
        uri = os.environ.get("MLFLOW_TRACKING_URI", "the tracking server")
        self._say(
            f"the tracking server {uri} does not answer; retrying for up to {longest_wait_seconds():.0f} s "
            "(MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT set how long)"
        )


@contextlib.contextmanager
def bounded_waiting(say: Callable[[str], None]) -> Iterator[None]:
    """Within the block: bounded MLflow HTTP retries (unless the user set them), and ``say(line)`` once on the first retry."""
    chosen_by_user = any(key in os.environ for key in BOUNDED)
    added = [] if chosen_by_user else [key for key in BOUNDED if key not in os.environ]
    for key in added:
        os.environ[key] = BOUNDED[key]
    logger = logging.getLogger(_RETRY_LOGGER)
    handler = _FirstRetry(say)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for key in added:
            os.environ.pop(key, None)
