"""All cores, the same bits: the engine's output does not depend on its thread count."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mlflow_taskvec.cli import main
from mlflow_taskvec.engine import TaskVector, merge, merge_to
from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS, parse_threads
from mlflow_taskvec.errors import TaskVecError

# a tensor of several chunks (the last one partial), matrices for the SVD methods, a norm
SHAPES = {"embed.weight": (2 * CHUNK_ELEMENTS // 512 + 100, 512), "layer.q.weight": (96, 128), "layer.down.weight": (128, 200), "norm.weight": (128,)}
PARAMS = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.4, "seed": 5}, "della": {"density": 0.4, "epsilon": 0.1},
          "tsv_m": {}, "breadcrumbs_ties": {"density": 0.3, "gamma": 0.02}, "task_arithmetic": {}}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A bf16 base and three fine-tunes (16-bit deltas tie at the trim thresholds; some entries unchanged)."""
    folder = tmp_path_factory.mktemp("threads")
    g = torch.Generator().manual_seed(21)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in SHAPES.items()}
    paths = [folder / "base.safetensors"]
    save_file({n: t.to(torch.bfloat16) for n, t in base.items()}, str(paths[0]))
    for i in range(3):
        ft = {}
        for n, t in base.items():
            noise = torch.randn(t.shape, generator=g) * 1e-3
            noise[torch.rand(t.shape, generator=g) < 0.1] = 0
            ft[n] = (t + noise).to(torch.bfloat16)
        paths.append(folder / f"ft{i}.safetensors")
        save_file(ft, str(paths[-1]))
    return paths


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_one_two_and_four_threads_write_the_same_bits(models, tmp_path, method):
    base, *fts = models
    vectors = [TaskVector.extract(base, ft) for ft in fts]
    digests = {}
    for threads in (1, 2, 4):
        out = tmp_path / f"{threads}.safetensors"
        result = merge_to(base, vectors, [1.0, 0.8, 0.6], out, method=method, scale=0.7, params=PARAMS[method], dtype="float32", threads=threads)
        digests[threads] = (_sha256(out), result.fingerprint)
    assert digests[1] == digests[2] == digests[4]
    # in memory on three threads: the same tensors, and a real merge (not the base)
    merged = merge(base, vectors, [1.0, 0.8, 0.6], method=method, scale=0.7, params=PARAMS[method], dtype="float32", threads=3)
    written = load_file(str(tmp_path / "1.safetensors"))
    assert set(merged) == set(written) and all(torch.equal(merged[n], written[n]) for n in written)
    assert not torch.equal(written["embed.weight"], load_file(str(base))["embed.weight"].float())


def test_the_cli_takes_threads_and_the_recipe_digest_ignores_them(models, tmp_path):
    base, *fts = models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base: {base}\nmethod: ties\nparams: {{density: 0.2}}\nscale: 0.5\nvectors:\n"
        + "".join(f"  - {{finetuned: {ft}}}\n" for ft in fts)
    )
    runner = CliRunner()
    lines = {}
    for threads in ("1", "4"):
        out = tmp_path / f"out{threads}.safetensors"
        res = runner.invoke(main, ["compose", str(recipe), "-o", str(out), "--threads", threads])
        assert res.exit_code == 0, res.output
        lines[threads] = [line for line in res.output.splitlines() if line.startswith(("recipe sha256", "fingerprint"))]
        assert len(lines[threads]) == 2
    assert lines["1"] == lines["4"]
    assert _sha256(tmp_path / "out1.safetensors") == _sha256(tmp_path / "out4.safetensors")
    res = runner.invoke(main, ["compose", str(recipe), "-o", str(tmp_path / "bad.safetensors"), "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output
    assert not (tmp_path / "bad.safetensors").exists()


def test_threads_default_to_the_cores_and_refuse_nonsense(models):
    assert parse_threads(None) == (os.cpu_count() or 1)
    assert parse_threads(3) == 3
    base, ft = models[0], models[1]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(TaskVecError, match="threads: .* must be a positive integer"):
            merge(base, [TaskVector.extract(base, ft)], [1.0], threads=bad)


def test_extract_on_one_two_and_four_threads_writes_the_same_bits_and_the_difference(models, tmp_path):
    base, ft = models[0], models[1]
    runner = CliRunner()
    digests = {}
    for threads in ("1", "2", "4"):
        out = tmp_path / f"tv{threads}.safetensors"
        res = runner.invoke(main, ["extract", "--base", str(base), "--finetuned", str(ft), "-o", str(out), "--threads", threads, "-q"])
        assert res.exit_code == 0, res.output
        digests[threads] = _sha256(out)
    assert digests["1"] == digests["2"] == digests["4"]
    # the vector is finetuned - base in float32 (the bf16 inputs' difference is exact there), tensor by tensor
    written, b, f = load_file(str(tmp_path / "tv4.safetensors")), load_file(str(base)), load_file(str(ft))
    assert set(written) == set(SHAPES)
    for name in SHAPES:
        assert torch.equal(written[name], f[name].double().sub(b[name].double()).float())
    # the library's save on three threads: the same file
    out = tmp_path / "lib3.safetensors"
    TaskVector.extract(base, ft).save(out, threads=3)
    assert _sha256(out) == digests["1"]
    res = runner.invoke(main, ["extract", "--base", str(base), "--finetuned", str(ft), "-o", str(tmp_path / "bad.safetensors"), "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output
    assert not (tmp_path / "bad.safetensors").exists()
