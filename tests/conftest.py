"""Shared fixtures: small real safetensors checkpoints written with safetensors itself.

Inputs are always written with ``safetensors.torch.save_file`` (and outputs read
back with ``safetensors.torch.load_file``), so every test also proves interop
with the reference implementation of the format.

The MLflow fixtures at the end (``registry``, ``client``, ``team_server``) import
their helpers only when a test asks for them.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors.torch import save_file

# In CI the property tests draw the same examples every run (a failure there replays locally
# with CI=1), and a failing example prints the blob that reproduces it.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Under pytest -n each worker gets its share of the cores for torch's own (OpenMP) threads, in
# this process and in every process it starts (they inherit the variable): two workers of two
# threads each on two cores spin at each other's barriers, and training the digits example then
# took 8x as long. A value the user set stays.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """The ``pipeline`` files first, then the files that declare the most seconds
    (``pytest.mark.seconds(N)``), then the rest, each group in collection order. Under ``make
    test``'s ``pytest -n auto --dist loadfile --no-loadscope-reorder`` each file runs whole on
    one worker and files go out in this order: the pipelines start at once, each on a worker of
    its own, the long files follow and the short ones fill the end, so both workers finish
    together (CONTRIBUTING.md, "Running the tests in parallel"). Without ``-n`` only the order
    changes."""

    def key(item):
        declared = item.get_closest_marker("seconds")
        return item.get_closest_marker("pipeline") is None, -(declared.args[0] if declared else 0)

    items.sort(key=key)


# Files an HF model directory carries besides its weights.
NON_WEIGHT_FILES = {
    "config.json": json.dumps({"model_type": "tiny", "hidden_size": 8}),
    "generation_config.json": json.dumps({"max_length": 16}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 16}),
    "special_tokens_map.json": json.dumps({"eos_token": "</s>"}),
}


def tiny_model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small transformer-shaped state dict with integer and bool buffers."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "embed.weight": randn(16, 8),
        "layers.0.attn.weight": randn(8, 8),
        "layers.0.attn.bias": randn(8),
        "layers.1.mlp.weight": randn(12, 8),
        "norm.weight": randn(8),
        "position_ids": torch.arange(16, dtype=torch.int64).unsqueeze(0),
        "attn.mask": torch.tensor([True, False, True, True]),
    }


def finetune_of(base: dict[str, torch.Tensor], seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """``base`` plus small noise on every floating tensor; buffers unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * std
            out[name] = (t.float() + noise).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def write_hf_dir(
    directory: Path,
    state_dict: dict[str, torch.Tensor],
    num_shards: int = 1,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """An HF-style model directory: ``model.safetensors``, or interleaved shards plus
    ``model.safetensors.index.json``; and the usual non-weight files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state_dict)
    if num_shards == 1:
        save_file(state_dict, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(num_shards):
            shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            group = names[i::num_shards]
            save_file({n: state_dict[n] for n in group}, str(directory / shard))
            weight_map.update({n: shard for n in group})
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index), "utf-8")
    for fname, content in (NON_WEIGHT_FILES if extra_files is None else extra_files).items():
        (directory / fname).write_text(content, "utf-8")
    return directory


def write_raw_safetensors(path: Path, header: object, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file with exactly the header and data given (for corrupt inputs)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    Path(path).write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return Path(path)


def leftovers(parent: Path) -> list[str]:
    """Temporary files a writer may leave next to its output."""
    return sorted(p.name for p in Path(parent).iterdir() if any(mark in p.name for mark in (".partial-", ".old-", ".aside-")) or p.name.endswith(".lock"))


def assert_no_output_at(path: Path) -> None:
    path = Path(path)
    assert not path.exists(), f"{path} was left behind"
    assert leftovers(path.parent) == []


@dataclass
class ModelSet:
    """A base and its fine-tunes, as single safetensors files and as state dicts."""

    base: Path
    finetunes: list[Path]
    base_sd: dict[str, torch.Tensor] = field(repr=False)
    finetune_sds: list[dict[str, torch.Tensor]] = field(repr=False)


def make_model_set(directory: Path, dtype: torch.dtype, num_finetunes: int = 3, seed: int = 0) -> ModelSet:
    directory.mkdir(parents=True, exist_ok=True)
    base_sd = tiny_model(seed, dtype)
    fts = [finetune_of(base_sd, seed + 100 + i) for i in range(num_finetunes)]
    save_file(base_sd, str(directory / "base.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        save_file(ft, str(directory / f"ft{i}.safetensors"))
        paths.append(directory / f"ft{i}.safetensors")
    return ModelSet(directory / "base.safetensors", paths, base_sd, fts)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def fp32_models(tmp_path) -> ModelSet:
    return make_model_set(tmp_path / "fp32", torch.float32)


@pytest.fixture
def bf16_models(tmp_path) -> ModelSet:
    return make_model_set(tmp_path / "bf16", torch.bfloat16)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An empty directory for outputs, so leftover checks see only what a test wrote."""
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def hf_dir():
    """``write_hf_dir(directory, state_dict, num_shards=1, extra_files=None)``."""
    return write_hf_dir


@pytest.fixture(scope="session")
def raw_safetensors():
    """``write_raw_safetensors(path, header, data, header_len=None)``."""
    return write_raw_safetensors


@pytest.fixture(scope="session")
def assert_no_output():
    """``assert_no_output(path)``: nothing at ``path`` and no temporary leftovers beside it."""
    return assert_no_output_at


@pytest.fixture(scope="session")
def model_set_factory():
    """``make_model_set(directory, dtype, num_finetunes=3, seed=0)`` for module-scoped sets."""
    return make_model_set


@pytest.fixture(scope="module")
def registry(request, tmp_path_factory):
    """``build_registry`` (tests/mlflow_helpers.py) on a sqlite store of the module's own:
    digits-base, two task vectors and ``digits-composite`` version 1, shared by the
    module's tests, which leave it as built (tests that register more use names of their own)."""
    from mlflow_helpers import build_registry, mlflow_store, template_db

    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    with mlflow_store(root, template_db(tmp_path_factory)) as store:
        yield build_registry(store)


@pytest.fixture
def client(registry):
    """The ``registry`` store's ``MlflowClient``."""
    return registry.store.client


@pytest.fixture(scope="session")
def team_server(tmp_path_factory):
    """A real ``mlflow server --app-name basic-auth`` on a fresh PostgreSQL database
    (``tests/team_server.py``), shared by the session and stopped and dropped at its end."""
    from team_server import start_server

    server = start_server(tmp_path_factory.mktemp("team-server"))
    yield server
    server.close()
