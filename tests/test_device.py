"""The device option: parsing, and the device machinery (staging, prefetch, the job runner)
run with ``device: cpu``, whose outputs are bit-identical to the default executor's.

On a machine with a CUDA GPU the same tests also run with ``cuda`` (task arithmetic
bit-identical, the other methods within 1e-6); here they skip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from team_server import needs_cuda

from mlflow_taskvec import TaskVecError, TaskVector, merge_to, open_checkpoint
from mlflow_taskvec.engine.compressed import compress
from mlflow_taskvec.engine.device import DeviceCheckpoint, DeviceRunner, parse_device
from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS

METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.2}),
    ("magnitude_prune", {"density": 0.3}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A bf16 base with one tensor of more than two chunks, two fine-tunes and a saved vector."""
    root = tmp_path_factory.mktemp("device")
    g = torch.Generator().manual_seed(0)
    base = {
        "big.weight": torch.randn(2 * CHUNK_ELEMENTS + 4096, generator=g).reshape(-1, 64).to(torch.bfloat16),
        "small.weight": torch.randn(24, 8, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(8),
    }
    save_file(base, str(root / "base.safetensors"))
    for i in range(2):
        ft = {n: (t.float() + 0.02 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t for n, t in base.items()}
        save_file(ft, str(root / f"ft{i}.safetensors"))
    TaskVector.extract(root / "base.safetensors", root / "ft1.safetensors").save(root / "v1.safetensors")
    return root


def _vectors(root):
    extracted = TaskVector.extract(root / "base.safetensors", root / "ft0.safetensors")
    # a vector of two terms: a stored one and one extracted on the fly
    combined = 0.5 * TaskVector.load(root / "v1.safetensors") - 0.25 * extracted
    return [extracted, combined, TaskVector.load(root / "v1.safetensors")]


# -- parsing ------------------------------------------------------------------------


def test_cpu_and_auto_name_a_device_of_this_machine():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(" CPU ") == torch.device("cpu")
    assert parse_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device(None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused_in_one_line(value):
    with pytest.raises(TaskVecError) as err:
        parse_device(value)
    message = str(err.value)
    assert message.startswith(f"device: {value!r} needs a CUDA GPU, and this torch {torch.__version__} is ")
    assert message.endswith("(use cpu or auto)") and "\n" not in message


@pytest.mark.parametrize("value", ["tpu", "gpu", "cuda:x", "cpu:1", ""])
def test_an_unknown_device_is_refused_naming_the_choices(value):
    with pytest.raises(TaskVecError, match=r"device: .* is not one of cpu, cuda, cuda:N or auto"):
        parse_device(value)


def test_merge_refuses_a_bad_device_before_writing(models, tmp_path):
    with pytest.raises(TaskVecError, match="device: 'tpu'"):
        merge_to(models / "base.safetensors", _vectors(models)[:1], [1.0], tmp_path / "out.safetensors", device="tpu")
    assert not list(tmp_path.iterdir())


# -- the machinery, on the CPU ------------------------------------------------------


@pytest.mark.parametrize("method, params", METHODS, ids=[m for m, _ in METHODS])
def test_device_cpu_gives_the_default_executors_bits(models, tmp_path, method, params):
    vectors = _vectors(models)
    weights = [1.0, 0.7, -0.4]
    default = merge_to(models / "base.safetensors", vectors, weights, tmp_path / "default.safetensors", method=method, scale=0.8, params=params)
    on_cpu = merge_to(models / "base.safetensors", vectors, weights, tmp_path / "cpu.safetensors", method=method, scale=0.8, params=params, device="cpu")

    assert on_cpu.fingerprint == default.fingerprint
    a, b = load_file(str(tmp_path / "default.safetensors")), load_file(str(tmp_path / "cpu.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a) and a["big.weight"].dtype == torch.bfloat16


def test_device_cpu_composes_compressed_vectors_with_the_same_bits(models, tmp_path):
    compress(TaskVector.load(models / "v1.safetensors"), tmp_path / "c.safetensors", "lowrank", rank=4)
    vectors = [TaskVector.load(tmp_path / "c.safetensors")]
    default = merge_to(models / "base.safetensors", vectors, [1.0], tmp_path / "default.safetensors", scale=0.5)
    on_cpu = merge_to(models / "base.safetensors", vectors, [1.0], tmp_path / "cpu.safetensors", scale=0.5, device="cpu")
    assert on_cpu.fingerprint == default.fingerprint


def test_saving_a_vector_on_device_cpu_gives_the_same_file(models, tmp_path):
    vector = _vectors(models)[1]
    assert vector.save(tmp_path / "a.safetensors", device="cpu") == vector.save(tmp_path / "b.safetensors")


def test_a_device_checkpoint_starts_the_copy_of_the_next_chunk_when_a_chunk_is_read(models):
    ckpt = open_checkpoint(models / "base.safetensors")
    staged = DeviceCheckpoint(ckpt, DeviceRunner(torch.device("cpu")))
    numel = ckpt.spec("big.weight").numel

    first = staged.read_chunk("big.weight", 0, CHUNK_ELEMENTS, torch.float32)

    assert torch.equal(first, ckpt.read_chunk("big.weight", 0, CHUNK_ELEMENTS, torch.float32))
    assert list(staged._ahead) == [("big.weight", CHUNK_ELEMENTS, 2 * CHUNK_ELEMENTS)]
    second = staged.read_chunk("big.weight", CHUNK_ELEMENTS, 2 * CHUNK_ELEMENTS, torch.float32)  # taken from the prefetch
    assert torch.equal(second, ckpt.read_chunk("big.weight", CHUNK_ELEMENTS, 2 * CHUNK_ELEMENTS, torch.float32))
    assert list(staged._ahead) == [("big.weight", 2 * CHUNK_ELEMENTS, numel)]  # the last chunk is shorter
    staged.read_chunk("big.weight", 2 * CHUNK_ELEMENTS, numel, torch.float32)
    assert staged._ahead == {}  # nothing after the last chunk


# -- on a GPU -----------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("method, params", METHODS, ids=[m for m, _ in METHODS])
def test_cuda_matches_the_cpu(models, tmp_path, method, params):
    vectors = _vectors(models)
    weights = [1.0, 0.7, -0.4]
    runs = {}
    for device in ("cpu", "cuda"):  # float32 outputs, so that 1e-6 is below their rounding step
        runs[device] = merge_to(models / "base.safetensors", vectors, weights, tmp_path / f"{device}.safetensors", method=method,
                                params=params, dtype="float32", device=device)
    if method == "task_arithmetic":
        assert runs["cuda"].fingerprint == runs["cpu"].fingerprint
    a, b = load_file(str(tmp_path / "cpu.safetensors")), load_file(str(tmp_path / "cuda.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


# -- recipe and command line --------------------------------------------------------


def _cli(*args):
    from click.testing import CliRunner

    from mlflow_taskvec.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _recipe(root, tmp_path, device=None):
    import yaml

    recipe = {"base": str(root / "base.safetensors"), "method": "ties", "params": {"density": 0.3}, "scale": 0.5,
              "vectors": [{"finetuned": str(root / "ft0.safetensors")}, {"vector": str(root / "v1.safetensors"), "weight": 0.5}]}
    if device is not None:
        recipe["device"] = device
    path = tmp_path / f"recipe-{device}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_recipes_device_is_not_part_of_its_digest_and_gives_the_same_composite(models, tmp_path):
    from mlflow_taskvec.compose import compose_to
    from mlflow_taskvec.recipe import load_recipe

    plain, on_cpu = load_recipe(_recipe(models, tmp_path)), load_recipe(_recipe(models, tmp_path, "cpu"))

    assert on_cpu.device == "cpu" and plain.device is None
    assert on_cpu.sha256() == plain.sha256()
    assert compose_to(on_cpu, output=tmp_path / "a.safetensors").fingerprint == compose_to(plain, output=tmp_path / "b.safetensors").fingerprint


def test_a_recipe_naming_an_unknown_device_is_refused_by_field(models, tmp_path):
    result = _cli("compose", _recipe(models, tmp_path, "tpu"), "-o", tmp_path / "out.safetensors")

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'recipe-tpu.yaml'}: device: 'tpu' is not one of cpu, cuda, cuda:N or auto"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["compose", "extract"])
def test_device_cuda_without_cuda_stops_in_one_line_with_nothing_written(models, tmp_path, command):
    out = tmp_path / "out.safetensors"
    if command == "compose":
        result = _cli("compose", _recipe(models, tmp_path), "-o", out, "--device", "cuda")
    else:
        result = _cli("extract", "--base", models / "base.safetensors", "--finetuned", models / "ft0.safetensors", "-o", out, "--device", "cuda")

    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: device: 'cuda' needs a CUDA GPU, and this torch ")
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_compose_device_cpu_on_the_command_line_gives_the_default_bits(models, tmp_path):
    recipe = _recipe(models, tmp_path)
    a = _cli("compose", recipe, "-o", tmp_path / "a.safetensors", "--device", "cpu")
    b = _cli("compose", recipe, "-o", tmp_path / "b.safetensors")

    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert open_checkpoint(tmp_path / "a.safetensors").fingerprint() == open_checkpoint(tmp_path / "b.safetensors").fingerprint()


def test_compress_on_device_cpu_gives_the_same_file(models, tmp_path):
    vector = TaskVector.load(models / "v1.safetensors")
    a = compress(vector, tmp_path / "a.safetensors", "lowrank", energy=0.5, device="cpu")
    b = compress(vector, tmp_path / "b.safetensors", "lowrank", energy=0.5)
    assert a.fingerprint == b.fingerprint and a.encodings == b.encodings
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
