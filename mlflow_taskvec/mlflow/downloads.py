"""MLflow references: ``models:/name/version``, ``models:/name@alias``,
``models:/<model_id>``, ``runs:/<run_id>/path``, resolved to local checkpoints.

Downloads go to a cache keyed by content: a model logged by the ``taskvec``
flavor is keyed by its recorded fingerprint (read from its small MLmodel file
before anything large is fetched), anything else by its immutable URI. Every
download is checked against the fingerprint it should have before use, and a
cached copy whose fingerprint no longer matches is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.checkpoint import is_adapter
from mlflow_taskvec.engine.following import Follower
from mlflow_taskvec.engine.lora import adapter_fingerprint
from mlflow_taskvec.mlflow import flavor_conf as conf_keys
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow import uris
from mlflow_taskvec.mlflow.server import server_error
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.references import resolve_path as resolve_local_path



def cache_root() -> Path:
    root = os.environ.get("MLFLOW_TASKVEC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mlflow-taskvec"


@dataclass
class Resolved:
    """A reference resolved to something immutable and local."""

    uri: str  # as given
    canonical: str  # models:/name/version, models:/<model_id>, runs:/<id>/path, or an absolute path
    path: Path  # the local checkpoint (file or folder of safetensors)
    fingerprint: str
    conf: dict | None = None  # the taskvec flavor block, when there is one
    model_dir: Path | None = None  # the local MLflow model folder, when there is one
    name: str | None = None
    version: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    tags: dict = field(default_factory=dict)  # the registered version's tags


def _locate_model(ref: str) -> dict:
    """Where the artifacts behind an MLflow URI live, and what identifies them."""
    uri = uris.parse(ref)
    client = MlflowClient()
    try:
        if uri.kind == "model_id":
            lm = client.get_logged_model(uri.model_id)
            return {"canonical": f"models:/{lm.model_id}", "artifact_uri": lm.artifact_location, "model_id": lm.model_id, "run_id": lm.source_run_id}
        if uri.kind == "run":
            client.get_run(uri.run_id)  # a clear error for an unknown run
            # MLflow resolves runs:/ itself, including MLflow 3 models logged in the run
            # (stored under models/<model_id>, not under the run's artifact folder).
            canonical = f"runs:/{uri.run_id}/{uri.path}".rstrip("/")
            return {"canonical": canonical, "artifact_uri": canonical, "run_id": uri.run_id}
        mv = client.get_model_version_by_alias(uri.name, uri.alias) if uri.kind == "alias" else client.get_model_version(uri.name, uri.version)
        model_id = getattr(mv, "model_id", None)
        artifact_uri = client.get_logged_model(model_id).artifact_location if model_id else client.get_model_version_download_uri(mv.name, mv.version)
        return {
            "canonical": f"models:/{mv.name}/{mv.version}",
            "artifact_uri": artifact_uri,
            "name": mv.name,
            "version": str(mv.version),
            "model_id": model_id,
            "run_id": mv.run_id,
            "tags": dict(mv.tags or {}),
        }
    except MlflowException as exc:
        raise server_error(exc, ref) from None


def _download(artifact_uri: str, dst: Path, uri: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise server_error(exc, uri) from None
    except OSError as exc:
        raise TaskVecError(f"{uri}: download failed ({exc})") from None


def _read_mlmodel(artifact_uri: str, uri: str) -> dict | None:
    """The MLmodel file of a model folder, or None when there is none (a plain artifact)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri.rstrip("/") + "/MLmodel", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return yaml.safe_load(Path(local).read_text("utf-8"))


def weights_path(local: Path, mlmodel: dict | None) -> Path:
    """Where the safetensors weights are inside a downloaded artifact."""
    if mlmodel:
        flavors = mlmodel.get("flavors", {})
        if "taskvec" in flavors:
            return local / flavors["taskvec"].get(conf_keys.DATA, "data")
        if "sentence_transformers" in flavors:
            return local / flavors["sentence_transformers"].get("data", "model.sentence_transformer")
        if "transformers" in flavors:
            # a PEFT model: its adapter is the task vector (the weights beside it are wrapped copies)
            sub = flavors["transformers"].get("peft_adaptor") or flavors["transformers"].get("model_binary", "model")
            return local / sub
        candidates = sorted({p.parent for p in local.rglob("*.safetensors")})
        if candidates:
            return candidates[0]
        raise TaskVecError(f"{local}: the model has no safetensors weights (flavors: {', '.join(flavors)})")
    return local


def weights_fingerprint(path: Path, fresh: bool = False) -> str:
    """The fingerprint a download is checked against: a checkpoint's, or a PEFT adapter's own."""
    if is_adapter(path):
        return adapter_fingerprint(path, fresh=fresh)
    return open_checkpoint(path).fingerprint(fresh=fresh)


def _download_fingerprint(weights: Path, follower: Follower, expected: str | None) -> str:
    """The fingerprint of downloaded weights: the one taken while they were written when it is
    the one the registry recorded (no other bytes can give it), else a pass over the files."""
    followed = follower.fingerprint(weights) if expected else None
    if followed is not None and followed == expected:
        Follower.remember(weights, followed)
        return followed
    return weights_fingerprint(weights, fresh=True)


def _fingerprint_or_none(path: Path) -> str | None:
    try:
        return weights_fingerprint(path, fresh=True)
    except (TaskVecError, OSError):
        return None


def _move_into_cache(downloaded: Path, entry: Path, is_good) -> None:
    """Put a verified download at ``entry``; processes that fetch the same content at the
    same time all succeed, and the first complete copy stays (entries appear whole, by rename)."""
    try:
        os.replace(downloaded, entry)
        return
    except OSError:
        if not entry.is_dir():
            raise
    if is_good(entry):  # the same content, cached by someone else meanwhile
        return
    stale = entry.with_name(f".stale-{uuid.uuid4().hex[:8]}")  # a damaged copy: swap it out
    os.replace(entry, stale)
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(downloaded, entry)


def _expected_fingerprint(uri: str, conf: dict | None, tags: dict) -> str | None:
    """The fingerprint the weights must have: the one the registry recorded when the version
    was created (its ``taskvec.fingerprint`` tag, kept in the database, out of reach of
    whoever can write the artifact store), which the MLmodel file must agree with."""
    recorded = (conf or {}).get(conf_keys.FINGERPRINT)
    tagged = tags.get(tag.FINGERPRINT)
    if recorded and tagged and recorded != tagged:
        raise TaskVecError(
            f"{uri}: the MLmodel file records fingerprint {recorded[:16]}, the registered version {tagged[:16]} (tampered artifact)"
        )
    return tagged or recorded


def resolve(ref: str | os.PathLike, fresh: bool = False) -> Resolved:
    """Resolve a reference (MLflow URI or local path) to a verified local checkpoint.

    ``fresh=True`` downloads again even when the cache holds a good copy, so that what
    is checked is what the store holds now (``verify`` needs that).
    """
    text = os.fspath(ref)
    if not uris.is_mlflow_uri(text):
        path = resolve_local_path(text).resolve()
        conf = None
        model_dir = None
        if (path / "MLmodel").is_file():
            model_dir = path
            mlmodel = yaml.safe_load((path / "MLmodel").read_text("utf-8"))
            conf = mlmodel.get("flavors", {}).get("taskvec")
            path = weights_path(path, mlmodel)
        return Resolved(text, str(model_dir or path), path, weights_fingerprint(path, fresh=fresh), conf=conf, model_dir=model_dir)

    where = _locate_model(text)
    mlmodel = _read_mlmodel(where["artifact_uri"], text)
    conf = (mlmodel or {}).get("flavors", {}).get("taskvec")
    expected = _expected_fingerprint(text, conf, where.get("tags", {}))
    key = f"fp-{expected}" if expected else "uri-" + hashlib.sha256(where["canonical"].encode()).hexdigest()[:32]
    root = cache_root()
    entry, record = root / key, root / f"{key}.json"
    local = None
    if not fresh and entry.is_dir() and record.is_file():
        recorded = json.loads(record.read_text("utf-8"))["fingerprint"]
        try:
            if (expected is None or recorded == expected) and weights_fingerprint(weights_path(entry, mlmodel), fresh=True) == recorded:
                local = entry
        except TaskVecError:
            pass
        if local is None:  # tampered or damaged: fetch again
            shutil.rmtree(entry, ignore_errors=True)
            record.unlink(missing_ok=True)
    if local is None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".download-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with Follower(tmp) as follower:  # hashes the weights as the download writes them
                downloaded = _download(where["artifact_uri"], tmp, text)
            weights = weights_path(downloaded, mlmodel)
            try:
                got = _download_fingerprint(weights, follower, expected)
            except TaskVecError as exc:  # name the model, not the temporary download folder
                problem = str(exc).split(": ", 1)[1] if str(exc).startswith(str(tmp)) else str(exc)
                raise TaskVecError(f"{text}: its stored weights are unreadable: {problem}") from None
            if expected and got != expected:
                raise TaskVecError(
                    f"{text}: downloaded weights have fingerprint {got[:16]}, the model records {expected[:16]} (tampered or incomplete artifact)"
                )
            _move_into_cache(downloaded, entry, lambda folder: _fingerprint_or_none(weights_path(folder, mlmodel)) == got)
            tmp_record = tmp / "record.json"
            tmp_record.write_text(json.dumps({"fingerprint": got, "canonical": where["canonical"]}) + "\n", "utf-8")
            os.replace(tmp_record, record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        local = entry
    path = weights_path(local, mlmodel)
    fingerprint = json.loads(record.read_text("utf-8"))["fingerprint"]
    return Resolved(
        uri=text,
        canonical=where["canonical"],
        path=path,
        fingerprint=fingerprint,
        conf=conf,
        model_dir=local if mlmodel else None,
        name=where.get("name"),
        version=where.get("version"),
        model_id=where.get("model_id"),
        run_id=where.get("run_id"),
        tags=where.get("tags", {}),
    )


def resolve_to_path(uri: str) -> Path:
    """The ``models`` and ``runs`` entries of the reference-scheme table (see setup.cfg)."""
    return resolve(uri).path
