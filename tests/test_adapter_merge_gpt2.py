"""LoRA-to-LoRA merging of ``fan_in_fan_out`` adapters: GPT-2's Conv1D weights, stored (in, out).

A tiny GPT-2 built here from a config (no download) and real PEFT adapters on its Conv1D modules
(``c_attn``, ``c_proj``, ``c_fc``: PEFT saves them with ``fan_in_fan_out: true``). PEFT itself is
the reference: its ``get_delta_weight`` of each input, and ``merge_and_unload`` of the merged
adapter against the dense composite of the same recipe.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from team_server import import_or_skip_or_fail

peft = import_or_skip_or_fail("peft", "pip install -e '.[dev]'")
transformers = import_or_skip_or_fail("transformers", "pip install -e '.[dev]'")

from mlflow_taskvec import TaskVector, open_checkpoint  # noqa: E402
from mlflow_taskvec.engine.adapter_merge import merge_to_adapter  # noqa: E402
from mlflow_taskvec.engine.merging import merge  # noqa: E402
from mlflow_taskvec.errors import TaskVecError  # noqa: E402

PREFIX = "base_model.model."
TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 (2 layers, width 32), saved as safetensors."""
    folder = tmp_path_factory.mktemp("gpt2") / "base"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50, n_inner=48, bos_token_id=0, eos_token_id=0)
    transformers.GPT2Model(config).save_pretrained(folder, safe_serialization=True)
    return folder


def fresh(base: Path):
    return transformers.GPT2Model.from_pretrained(base, use_safetensors=True)


def make_adapter(base: Path, folder: Path, seed: int, r: int) -> Path:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "fan_in_fan_out is set to False ... Conv1D" note
        model = peft.get_peft_model(fresh(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2-adapters")
    return [make_adapter(gpt2, root / "a", 1, 4), make_adapter(gpt2, root / "b", 2, 2)]


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own delta of each LoRA module of ``adapter``, in the base weight's orientation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(fresh(base), adapter)
    return {
        f"{name.removeprefix(PREFIX)}.weight": module.get_delta_weight("default").double()
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def merged_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base with ``adapter`` merged in by PEFT (``merge_and_unload``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(fresh(base), adapter).merge_and_unload()
    return {n: t.detach().double() for n, t in model.state_dict().items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_peft_saves_gpt2_adapters_fan_in_fan_out_and_they_read_as_peft_s_deltas(gpt2, adapters):
    for adapter in adapters:
        assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        vector = TaskVector.load(adapter, base=gpt2)
        theirs = peft_deltas(gpt2, adapter)
        assert len(theirs) == 8  # 2 layers x (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
        for name, delta in theirs.items():
            assert tuple(delta.shape) == tuple(open_checkpoint(gpt2).spec(name).shape)  # Conv1D: (in, out)
            assert relative(vector.get_tensor(name, torch.float64), delta) < 1e-6, name  # PEFT multiplies in float32


@pytest.mark.parametrize("method, params, rank", [("task_arithmetic", {}, None), ("ties", {"density": 0.5}, 32)], ids=["task_arithmetic", "ties"])
def test_a_merged_fan_in_fan_out_adapter_loads_in_peft_with_the_dense_composite_s_weights(gpt2, adapters, tmp_path, method, params, rank):
    weights = [0.8, -0.5]
    vectors = [TaskVector.load(a, base=gpt2) for a in adapters]
    result = merge_to_adapter(gpt2, vectors, weights, tmp_path / "merged", method=method, params=params, rank=rank, base_model_name_or_path=str(gpt2))
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and len(result.modules) == 8
    # PEFT loads it (a Conv1D's factors in the wrong orientation would not even fit) ...
    ours = merged_weights(gpt2, tmp_path / "merged")
    # ... and merging it into the base gives the dense composite of the same merge
    composite = merge(open_checkpoint(gpt2), vectors, weights, method=method, params=params, dtype="float64", compute_dtype="float64")
    changed = [n for n in composite if "c_" in n and n.endswith(".weight")]
    assert len(changed) == 8
    for name in changed:
        tolerance = 1e-6 if method == "task_arithmetic" else 1e-5  # ties at rank 32 >= the module's size: lossless
        assert relative(ours[name], composite[name]) < tolerance, name
    if method == "task_arithmetic":  # the exact route: rank 4 + 2, PEFT's cat factor for factor
        assert {m.rank for m in result.modules} == {6} and all(m.exact for m in result.modules)
        for name in changed:
            expected = sum(w * d for w, d in zip(weights, (peft_deltas(gpt2, a)[name] for a in adapters)))
            base = open_checkpoint(gpt2).get_tensor(name).double()
            assert relative(ours[name] - base, expected) < 1e-6, name


def test_adapters_that_disagree_on_fan_in_fan_out_are_refused_and_nothing_is_written(gpt2, adapters, tmp_path):
    import shutil

    other = tmp_path / "flipped"
    shutil.copytree(adapters[1], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (other / "adapter_config.json").write_text(json.dumps(config))
    # read without fan_in_fan_out its factors give Conv1D's shapes transposed: the shape check refuses it first for c_attn
    with pytest.raises(TaskVecError, match="but it is"):
        TaskVector.load(other, base=gpt2)
    with pytest.raises(TaskVecError, match=r"vectors\[1\] has fan_in_fan_out false and vectors\[0\] true"):
        from mlflow_taskvec.engine.adapter_merge import adapters_fan_in_fan_out

        adapters_fan_in_fan_out([(0, adapters[0]), (1, other)])
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def gpt2_finetune(gpt2, tmp_path_factory) -> Path:
    """The tiny GPT-2 with every floating-point tensor moved a little: a dense fine-tune of it."""
    model = fresh(gpt2)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = tmp_path_factory.mktemp("gpt2-ft") / "ft"
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("rank", [32, 8], ids=["full_rank", "rank_8"])
def test_export_lora_of_a_dense_gpt2_vector_writes_a_fan_in_fan_out_adapter_peft_merges_to_base_plus_vector(gpt2, gpt2_finetune, tmp_path, rank):
    from mlflow_taskvec.compose import export_adapter

    TaskVector.extract(gpt2, gpt2_finetune).save(tmp_path / "vector")
    # as `export-lora vector/ --base gpt2/ --rank R` runs it: the layout is read from the base's config.json
    result = export_adapter(tmp_path / "vector", tmp_path / "lora", base=gpt2, rank=rank).result
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert len(result.tensors) == 10  # 8 Conv1D weights + wte and wpe (embedding LoRA)
    ours = merged_weights(gpt2, tmp_path / "lora")
    base, ft = open_checkpoint(gpt2), open_checkpoint(gpt2_finetune)
    for t in result.tensors:
        delta = ft.get_tensor(t.name).double() - base.get_tensor(t.name).double()
        error = relative(ours[t.name] - base.get_tensor(t.name).double(), delta)
        if rank == 32:  # every module's full rank: lossless
            assert error < 1e-5, t.name
        else:  # the SVD's own truncation error, as reported
            assert 0.1 < t.relative_error < 1 and abs(error - t.relative_error) < 1e-5, t.name


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_saved_gpt2_vector_records_its_base_s_layout_and_export_lora_without_base_writes_fan_in_fan_out(gpt2, gpt2_finetune, adapters, tmp_path):
    """``export-lora VECTOR`` without ``--base``: the saved vector's ``taskvec.base_conv1d`` gives the
    layout, and the adapter is the one ``--base`` gives (the same factors), which PEFT merges into
    ``base + vector``. A vector saved without that record (as before it existed) is written as
    Linear weights, as it always was; a vector of a non-GPT-2 base records nothing."""
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from mlflow_taskvec.cli import main as cli
    from mlflow_taskvec.compose import export_adapter

    vector = tmp_path / "vector.safetensors"
    TaskVector.extract(gpt2, gpt2_finetune).save(vector)
    assert _header(vector)["taskvec.base_conv1d"] == "true"
    with_base = export_adapter(vector, tmp_path / "with-base", base=gpt2, rank=32).result
    ran = CliRunner().invoke(cli, ["export-lora", str(vector), "-o", str(tmp_path / "no-base"), "--rank", "32", "-q"])
    assert (ran.exit_code, ran.stderr) == (0, ""), ran.output
    configs = [json.loads((tmp_path / folder / "adapter_config.json").read_text()) for folder in ("with-base", "no-base")]
    assert configs[1]["fan_in_fan_out"] is True and configs[1]["base_model_name_or_path"] is None
    assert {**configs[0], "base_model_name_or_path": None} == configs[1]
    factors = [load_file(tmp_path / folder / "adapter_model.safetensors") for folder in ("with-base", "no-base")]
    assert factors[0].keys() == factors[1].keys() and all(torch.equal(factors[0][k], factors[1][k]) for k in factors[0])
    ours, theirs = merged_weights(gpt2, tmp_path / "no-base"), merged_weights(gpt2, tmp_path / "with-base")
    base, ft = open_checkpoint(gpt2), open_checkpoint(gpt2_finetune)
    for t in with_base.tensors:  # 8 Conv1D weights and the two embeddings, at full rank: base + vector
        assert torch.equal(ours[t.name], theirs[t.name]), t.name
        delta = ft.get_tensor(t.name).double() - base.get_tensor(t.name).double()
        assert relative(ours[t.name] - base.get_tensor(t.name).double(), delta) < 1e-5, t.name

    # a GPT-2 adapter's vector records it too, and so does a compressed vector of the dense one
    TaskVector.extract(gpt2, adapters[0]).save(tmp_path / "adapter.tv.safetensors")
    assert _header(tmp_path / "adapter.tv.safetensors")["taskvec.base_conv1d"] == "true"
    ran = CliRunner().invoke(cli, ["compress", str(vector), "--format", "lowrank", "--rank", "4", "-o", str(tmp_path / "lowrank.safetensors"), "-q"])
    assert ran.exit_code == 0, ran.output
    assert _header(tmp_path / "lowrank.safetensors")["taskvec.base_conv1d"] == "true"

    # the same vector saved without the record: Linear weights, as before
    old = tmp_path / "old.safetensors"
    save_file(load_file(vector), old, metadata={k: v for k, v in _header(vector).items() if k != "taskvec.base_conv1d"})
    export_adapter(old, tmp_path / "old-lora", rank=32)
    assert json.loads((tmp_path / "old-lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is False

    # a base that is not GPT-2-style: no record
    config = json.loads((gpt2 / "config.json").read_text())
    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    (other / "model.safetensors").symlink_to(gpt2 / "model.safetensors")
    TaskVector.extract(other, gpt2_finetune).save(tmp_path / "other.safetensors")
    assert "taskvec.base_conv1d" not in _header(tmp_path / "other.safetensors")


def test_a_dense_input_merged_on_a_gpt2_base_gives_a_fan_in_fan_out_adapter(gpt2, gpt2_finetune, tmp_path):
    vector = TaskVector.extract(gpt2, gpt2_finetune)
    merge_to_adapter(gpt2, [vector], [0.5], tmp_path / "merged", rank=32)
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = merged_weights(gpt2, tmp_path / "merged")
    base = open_checkpoint(gpt2)
    for name in (n for n in base.keys() if "c_" in n and n.endswith(".weight")):
        assert relative(ours[name] - base.get_tensor(name).double(), 0.5 * vector.get_tensor(name, torch.float64)) < 1e-5, name


def test_export_lora_on_a_gpt2_base_refuses_a_linear_weight_unless_it_is_saved_whole(gpt2, gpt2_finetune, tmp_path):
    """A GPT-2-style adapter stores every LoRA module as Conv1D (fan_in_fan_out), so a plain 2-D
    weight beside them (a classification head, ``nn.Linear``) cannot be factored into it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mlflow_taskvec.compose import export_adapter

    folders = {}
    for name, source, seed in (("base", gpt2, 0), ("ft", gpt2_finetune, 1)):
        folders[name] = shutil.copytree(source, tmp_path / name)
        weights = load_file(folders[name] / "model.safetensors")
        weights["score.weight"] = torch.randn(3, 32, generator=torch.Generator().manual_seed(seed))
        save_file(weights, folders[name] / "model.safetensors", metadata={"format": "pt"})
    TaskVector.extract(folders["base"], folders["ft"]).save(tmp_path / "vector")

    with pytest.raises(TaskVecError, match=r"^modules_to_save: module 'score' is not a Conv1D of this GPT-2-style base.*name it here to write it whole$"):
        export_adapter(tmp_path / "vector", tmp_path / "lora", base=folders["base"], rank=8)
    assert not (tmp_path / "lora").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "vector"]
    from click.testing import CliRunner

    from mlflow_taskvec.cli import main as cli

    ran = CliRunner().invoke(cli, ["export-lora", str(tmp_path / "vector"), "-o", str(tmp_path / "lora"), "--base", str(folders["base"]), "--rank", "8"])
    assert (ran.exit_code, ran.stdout) == (1, "") and ran.stderr.splitlines() == [
        "Error: --modules-to-save: module 'score' is not a Conv1D of this GPT-2-style base, whose adapter stores every module as "
        "Conv1D (fan_in_fan_out): name it here to write it whole"
    ]
    assert not (tmp_path / "lora").exists()

    export_adapter(tmp_path / "vector", tmp_path / "lora", base=folders["base"], rank=8, modules_to_save=["score"])
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["modules_to_save"] == ["score"]
