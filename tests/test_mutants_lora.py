"""The LoRA reader's and writer's promises (docs/lora-hf.md, engine/lora.py's docstring) against
references written from that text, on small hand-written adapters and a tiny base: each delta is
``(B @ A) * lora_alpha / r`` (``lora_alpha`` 8 when the config leaves it out; ``/ sqrt(r)`` with
``use_rslora``), transposed for embedding LoRA and ``fan_in_fan_out``; tensors saved whole are
``saved - base``; ``lora_B.bias`` adds ``bias * scaling``; every other floating-point tensor of the
base is a zero delta; and every bad input is one line naming the file and the field or tensor.
The export side: a truncated SVD per 2-D ``*.weight`` at scaling 1, ``modules_to_save`` written as
``base + delta``, the shares of what a LoRA adapter cannot hold, and its refusals.
These tests kill the mutants of engine/lora.py that ``make mutation`` found alive (docs/mutation.md).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlflow_taskvec import TaskVecError, TaskVector, open_checkpoint
from mlflow_taskvec.engine.lora import export_lora, open_adapter, read_adapter_config
from mlflow_taskvec.errors import TaskVecWarning

P = "base_model.model."
# the base: a Linear weight and bias, an embedding, a head, a LayerNorm and an integer buffer
BASE_SHAPES = {"enc.q.weight": (6, 4), "enc.q.bias": (6,), "emb.weight": (10, 4), "head.weight": (3, 4), "norm.weight": (4,)}


def _base(folder: Path) -> Path:
    g = torch.Generator().manual_seed(11)
    tensors = {n: torch.randn(*s, generator=g) for n, s in BASE_SHAPES.items()}
    tensors["ids"] = torch.arange(5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _adapter(folder: Path, config: dict, tensors: dict, peft_type="LORA") -> Path:
    folder.mkdir(parents=True)
    body = {"peft_type": peft_type, **config} if peft_type is not None else dict(config)
    (folder / "adapter_config.json").write_text(json.dumps(body), "utf-8")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _factors(r: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, 4, generator=g), torch.randn(6, r, generator=g)  # A (r, in), B (out, r)


@pytest.fixture
def base(tmp_path):
    return _base(tmp_path / "base")


def _q_adapter(tmp_path, config, r=2, name="lora", **extra):
    a, b = _factors(r)
    return _adapter(tmp_path / name, {"r": r, **config}, {f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b, **extra}), a, b


# -- reading: the deltas ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, scaling",
    [({"lora_alpha": 6}, 6 / 2), ({}, 8 / 2), ({"lora_alpha": 6, "use_rslora": True}, 6 / math.sqrt(2)),
     ({"lora_alpha": 6, "use_rslora": False}, 6 / 2), ({"lora_alpha": 6, "alpha_pattern": {"q": 10}}, 10 / 2)],
    ids=["alpha", "default-alpha-8", "rslora", "no-rslora", "alpha-pattern"],
)
def test_a_linear_delta_is_b_at_a_times_alpha_over_r_and_the_rest_of_the_base_is_zero(tmp_path, base, config, scaling):
    folder, a, b = _q_adapter(tmp_path, config)

    ckpt = open_adapter(folder, base)

    expected = (b.double() @ a.double()) * scaling
    torch.testing.assert_close(ckpt.get_tensor("enc.q.weight").double(), expected, rtol=1e-6, atol=1e-7)
    assert ckpt.rank("enc.q.weight") == 2 and ckpt.stored_bytes == (2 * 4 + 6 * 2) * 4  # the factors A and B, float32; zeros store nothing
    assert sorted(ckpt.keys()) == sorted(BASE_SHAPES)  # the integer buffer is left out, every float tensor is there
    for name in ("enc.q.bias", "emb.weight", "head.weight", "norm.weight"):
        assert ckpt.rank(name) == 0 and torch.equal(ckpt.get_tensor(name), torch.zeros(BASE_SHAPES[name]))
    meta = ckpt.metadata()
    assert meta["taskvec.kind"] == "task_vector" and meta["taskvec.adapter"] == "peft_lora" and meta["taskvec.layout"] == "lowrank"
    assert meta["taskvec.base_fingerprint"] == open_checkpoint(base).fingerprint()
    assert json.loads(meta["taskvec.skipped"]) == ["ids"]


def test_a_rank_pattern_sets_the_module_s_r_and_so_its_scaling(tmp_path, base):
    folder, a, b = _q_adapter(tmp_path, {"lora_alpha": 6, "rank_pattern": {"q": 3}}, r=3)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 5, "lora_alpha": 6, "rank_pattern": {"q": 3}}))

    ckpt = open_adapter(folder, base)

    torch.testing.assert_close(ckpt.get_tensor("enc.q.weight").double(), (b.double() @ a.double()) * 6 / 3, rtol=1e-6, atol=1e-7)
    assert ckpt.rank("enc.q.weight") == 3


def test_fan_in_fan_out_transposes_the_product(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = tmp_path / "b.safetensors"
    save_file({"c.weight": torch.randn(4, 6, generator=g)}, str(base))  # stored (in, out)
    a, b = torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    folder = _adapter(tmp_path / "l", {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True}, {f"{P}c.lora_A.weight": a, f"{P}c.lora_B.weight": b})

    got = open_adapter(folder, base).get_tensor("c.weight").double()

    torch.testing.assert_close(got, (b.double() @ a.double()).T, rtol=1e-6, atol=1e-7)


def test_embedding_lora_is_the_transposed_product_of_lora_embedding_a_and_b(tmp_path, base):
    g = torch.Generator().manual_seed(3)
    a_e, b_e = torch.randn(2, 10, generator=g), torch.randn(4, 2, generator=g)  # A_e (r, num_embeddings), B_e (dim, r)
    folder = _adapter(tmp_path / "l", {"r": 2, "lora_alpha": 4}, {f"{P}emb.lora_embedding_A": a_e, f"{P}emb.lora_embedding_B": b_e})

    got = open_adapter(folder, base).get_tensor("emb.weight").double()

    torch.testing.assert_close(got, (b_e.double() @ a_e.double()).T * 2, rtol=1e-6, atol=1e-7)


def test_tensors_saved_whole_are_saved_minus_base_and_lora_bias_adds_its_scaled_bias(tmp_path, base):
    g = torch.Generator().manual_seed(4)
    base_t = load_file(str(base / "model.safetensors"))
    head = base_t["head.weight"] + torch.randn(3, 4, generator=g)
    q_bias = base_t["enc.q.bias"] + torch.randn(6, generator=g)
    lora_bias = torch.randn(6, generator=g)
    folder, _, _ = _q_adapter(tmp_path, {"lora_alpha": 6}, **{
        f"{P}head.weight": head,
        f"{P}enc.q.base_layer.bias": q_bias,
    })
    ckpt = open_adapter(folder, base)
    assert ckpt.rank("head.weight") is None and torch.equal(ckpt.get_tensor("head.weight"), head - base_t["head.weight"])
    assert torch.equal(ckpt.get_tensor("enc.q.bias"), q_bias - base_t["enc.q.bias"])

    only_bias, _, _ = _q_adapter(tmp_path, {"lora_alpha": 6, "lora_bias": True}, name="lb", **{f"{P}enc.q.lora_B.bias": lora_bias})
    ckpt = open_adapter(only_bias, base)
    torch.testing.assert_close(ckpt.get_tensor("enc.q.bias").double(), lora_bias.double() * 3, rtol=1e-6, atol=1e-7)
    assert ckpt.rank("enc.q.bias") is None


def test_a_targeted_embedding_saved_whole_with_the_base_s_values_is_the_factors_alone(tmp_path, base):
    g = torch.Generator().manual_seed(5)
    a_e, b_e = torch.randn(2, 10, generator=g), torch.randn(4, 2, generator=g)
    base_emb = load_file(str(base / "model.safetensors"))["emb.weight"]
    parts = {f"{P}emb.lora_embedding_A": a_e, f"{P}emb.lora_embedding_B": b_e}
    base_head = load_file(str(base / "model.safetensors"))["head.weight"]
    same = _adapter(tmp_path / "same", {"r": 2, "lora_alpha": 2}, {**parts, f"{P}emb.base_layer.weight": base_emb.clone(), f"{P}head.weight": base_head + 2})
    other = _adapter(tmp_path / "other", {"r": 2, "lora_alpha": 2}, {**parts, f"{P}emb.base_layer.weight": base_emb + 1})

    ckpt = open_adapter(same, base)
    torch.testing.assert_close(ckpt.get_tensor("emb.weight").double(), (b_e.double() @ a_e.double()).T)
    torch.testing.assert_close(ckpt.get_tensor("head.weight"), torch.full((3, 4), 2.0))  # the tensors after it are read too
    with pytest.raises(TaskVecError, match=re.escape("tensor 'emb.weight' is both a LoRA target and saved whole with other values than the base's")):
        open_adapter(other, base)


def test_without_a_base_the_adapter_s_local_base_model_name_or_path_is_used(tmp_path, base):
    folder, a, b = _q_adapter(tmp_path, {"lora_alpha": 2, "base_model_name_or_path": str(base)})
    torch.testing.assert_close(open_adapter(folder).get_tensor("enc.q.weight").double(), b.double() @ a.double(), rtol=1e-6, atol=1e-7)

    hub, _, _ = _q_adapter(tmp_path, {"base_model_name_or_path": "org/model"}, name="hub")
    with pytest.raises(TaskVecError, match=re.escape("give the base (its base_model_name_or_path 'org/model' is not a local folder)")):
        open_adapter(hub)
    unnamed, _, _ = _q_adapter(tmp_path, {}, name="unnamed")
    with pytest.raises(TaskVecError, match=re.escape("give the base (its base_model_name_or_path None is not a local folder)")):
        open_adapter(unnamed)


def test_an_adapter_naming_another_local_base_is_warned_about_and_its_own_is_not(tmp_path, base):
    other = _base(tmp_path / "other")
    save_file({**load_file(str(other / "model.safetensors")), "norm.weight": torch.ones(4)}, str(other / "model.safetensors"))
    folder, _, _ = _q_adapter(tmp_path, {"base_model_name_or_path": str(other)})
    with pytest.warns(TaskVecWarning, match="^" + re.escape(f"{folder}: the adapter was trained on {str(other)!r}, not on the base {base}")):
        open_adapter(folder, base)
    own, _, _ = _q_adapter(tmp_path, {"base_model_name_or_path": str(base)}, name="own")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskVecWarning)
        open_adapter(own, base)


# -- reading: refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ([1, 2], "adapter_config.json: an adapter config must be a JSON object"),
        ({"r": 2}, "adapter_config.json: peft_type: None is not LORA (only LoRA adapters are task vectors)"),
        ({"peft_type": "LOHA", "r": 2}, "adapter_config.json: peft_type: 'LOHA' is not LORA"),
        ({"peft_type": "LORA", "r": 2, "target_parameters": ["x"]}, "adapter_config.json: target_parameters: not supported in a task vector"),
        ({"peft_type": "LORA", "r": 2, "trainable_token_indices": [1]}, "adapter_config.json: trainable_token_indices: not supported in a task vector"),
        ({"peft_type": "LORA", "r": 2, "layer_replication": [[0, 1]]}, "adapter_config.json: layer_replication: not supported in a task vector"),
        ({"peft_type": "LORA", "r": 2, "rank_pattern": {"q": 0}}, "adapter_config.json: rank_pattern['q']: 0 must be a positive whole number"),
        ({"peft_type": "LORA", "r": 2, "alpha_pattern": {"q": "x"}}, "adapter_config.json: alpha_pattern['q']: 'x' is not a number"),
        ({"peft_type": "LORA", "r": 2, "lora_alpha": "x"}, "adapter_config.json: lora_alpha: 'x' is not a number"),
        ({"peft_type": "LORA", "r": True}, "adapter_config.json: r: True must be a positive whole number"),
    ],
    ids=["not-object", "no-peft-type", "loha", "target-parameters", "trainable-tokens", "layer-replication", "rank-pattern",
         "alpha-pattern", "alpha", "r-bool"],
)
def test_a_bad_config_is_one_line_naming_the_file_and_the_field(tmp_path, config, message):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config), "utf-8")
    with pytest.raises(TaskVecError, match="^" + re.escape(f"{tmp_path / 'adapter_config.json'}: ") + re.escape(message.partition(": ")[2])):
        read_adapter_config(tmp_path)


def test_a_config_s_defaults_and_accepted_fields(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "lora", "r": 4, "target_parameters": [], "trainable_token_indices": None, "layer_replication": None, "use_dora": False,
        "base_model_name_or_path": "", "rank_pattern": {"a": 2}, "alpha_pattern": {"b": 3}}), "utf-8")
    config = read_adapter_config(tmp_path)
    assert (config.r, config.lora_alpha, config.use_rslora, config.fan_in_fan_out) == (4, 8.0, False, False)
    assert config.rank_pattern == {"a": 2} and config.alpha_pattern == {"b": 3.0} and config.base_model_name_or_path is None
    for raw in (b"\xff\xfe{", b""):
        (tmp_path / "adapter_config.json").write_bytes(raw)
        with pytest.raises(TaskVecError, match=re.escape(f"{tmp_path / 'adapter_config.json'}: not a valid JSON adapter config")):
            read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(TaskVecError, match="not a valid JSON adapter config"):
        read_adapter_config(tmp_path)


def test_a_folder_without_safetensors_weights_is_refused_naming_them(tmp_path, base):
    folder, _, _ = _q_adapter(tmp_path, {})
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(TaskVecError, match="^" + re.escape(f"{folder}: no adapter_model.safetensors") + "$"):
        open_adapter(folder, base)


def _one_line(match: str):
    return pytest.raises(TaskVecError, match=re.escape(match))


def test_bad_factors_are_refused_naming_the_module_or_tensor(tmp_path, base):
    a, b = _factors(2)
    cases = {
        "dora": ({f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b, f"{P}enc.q.lora_magnitude_vector": torch.ones(6)},
                 f"tensor '{P}enc.q.lora_magnitude_vector' is a DoRA magnitude vector; DoRA adapters are not supported"),
        "only-a": ({f"{P}enc.q.lora_A.weight": a}, "module 'enc.q' has only one of its LoRA factors A and B"),
        "only-b": ({f"{P}enc.q.lora_B.weight": b}, "module 'enc.q' has only one of its LoRA factors A and B"),
        "only-embedding-a": ({f"{P}emb.lora_embedding_A": a}, "module 'emb' has only one of its LoRA factors A and B"),
        "3-d": ({f"{P}enc.q.lora_A.weight": a[None], f"{P}enc.q.lora_B.weight": b},
                f"factor '{P}enc.q.lora_A.weight' is 3-D torch.float32; only Linear and Embedding LoRA (2-D floating-point factors) are supported"),
        "int-b": ({f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b.to(torch.int32)}, f"factor '{P}enc.q.lora_B.weight' is 2-D torch.int32"),
        "a-rows": ({f"{P}enc.q.lora_A.weight": torch.ones(3, 4), f"{P}enc.q.lora_B.weight": b},
                   "module 'enc.q' has factors A [3, 4] and B [6, 2], which disagree with its r = 2"),
        "b-cols": ({f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": torch.ones(6, 3)},
                   "module 'enc.q' has factors A [2, 4] and B [6, 3], which disagree with its r = 2"),
        "int-whole": ({f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b, f"{P}head.weight": torch.ones(3, 4, dtype=torch.int64)},
                      f"tensor '{P}head.weight' is not floating point"),
        "whole-shape": ({f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b, f"{P}head.weight": torch.ones(4, 3)},
                        f"tensor '{P}head.weight' gives 'head.weight' the shape [4, 3], but it is [3, 4] in the base"),
        "bias-shape": ({f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b, f"{P}enc.q.lora_B.bias": torch.ones(5)},
                       f"tensor '{P}enc.q.lora_B.bias' gives 'enc.q.bias' the shape [5], but it is [6] in the base"),
        "whole-absent": ({f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b, f"{P}extra.weight": torch.ones(2)},
                         f"tensor '{P}extra.weight' changes 'extra.weight', which the base"),
    }
    for label, (tensors, message) in cases.items():
        folder = _adapter(tmp_path / label, {"r": 2}, tensors)
        with _one_line(f"{folder}: {message}"):
            open_adapter(folder, base)


def test_a_module_changing_a_tensor_that_is_not_floating_point_in_the_base_is_refused(tmp_path):
    base = tmp_path / "b.safetensors"
    save_file({"ids.weight": torch.ones(5, 4, dtype=torch.int64)}, str(base))
    folder = _adapter(tmp_path / "l", {"r": 2}, {f"{P}ids.lora_A.weight": torch.ones(2, 4), f"{P}ids.lora_B.weight": torch.ones(5, 2)})
    with _one_line(f"{folder}: module 'ids' changes 'ids.weight', which is not floating point in the base"):
        open_adapter(folder, base)


# -- writing ----------------------------------------------------------------------------------------


@pytest.fixture
def dense_vector(tmp_path, base):
    """A vector of the base with a rank-2 change of enc.q, a full-rank head, a bias and a LayerNorm change."""
    g = torch.Generator().manual_seed(9)
    tensors = load_file(str(base / "model.safetensors"))
    delta = {n: torch.zeros(s) for n, s in BASE_SHAPES.items()}
    delta["enc.q.weight"] = torch.randn(6, 2, generator=g) @ torch.randn(2, 4, generator=g)
    delta["head.weight"] = torch.randn(3, 4, generator=g)
    delta["enc.q.bias"] = torch.randn(6, generator=g)
    delta["norm.weight"] = torch.randn(4, generator=g)
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({n: tensors[n] + delta.get(n, 0) if n in delta else tensors[n] for n in tensors}, str(ft / "model.safetensors"))
    return TaskVector.extract(base, ft, task="t1"), delta


def _svd_error_sq(delta: torch.Tensor, rank: int) -> tuple[float, float]:
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum()), float(s.square().sum())


def test_export_writes_the_truncated_svd_at_scaling_one_and_reports_what_it_left_out(tmp_path, dense_vector):
    vector, delta = dense_vector
    seen = []

    result = export_lora(vector, tmp_path / "out", rank=1, progress=seen.append)
    delta = {n: vector.get_tensor(n, torch.float32).double() for n in delta}  # what the export reads: base + delta - base in float32

    assert seen == list(vector.names)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["modules_to_save"]) == (1, 1, {}, None)
    assert config["target_modules"] == ["enc.q", "head"] and config["peft_type"] == "LORA" and config["fan_in_fan_out"] is False
    assert result.r == 1 and [(t.name, t.module, t.rank, t.embedding) for t in result.tensors] == [("enc.q.weight", "enc.q", 1, False), ("head.weight", "head", 1, False)]
    assert sorted(result.zero) == ["emb.weight"] and result.saved_whole == []
    totals = {n: float(d.double().square().sum()) for n, d in delta.items()}
    whole = sum(totals.values())
    assert result.left_out == pytest.approx({"enc.q.bias": totals["enc.q.bias"] / whole, "norm.weight": totals["norm.weight"] / whole}, rel=1e-9)
    errors = {n: _svd_error_sq(delta[n], 1) for n in ("enc.q.weight", "head.weight")}
    for t in result.tensors:
        assert t.relative_error == pytest.approx(math.sqrt(errors[t.name][0] / errors[t.name][1]), rel=1e-4)
    error_sq = sum(e for e, _ in errors.values()) + totals["enc.q.bias"] + totals["norm.weight"]
    assert result.relative_error == pytest.approx(math.sqrt(error_sq / whole), rel=1e-4)
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert set(saved) == {f"{P}enc.q.lora_A.weight", f"{P}enc.q.lora_B.weight", f"{P}head.lora_A.weight", f"{P}head.lora_B.weight"}
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta == {"format": "pt", "taskvec.base_fingerprint": vector.base_fingerprint, "taskvec.task": "t1"}


def test_export_by_energy_keeps_the_fewest_ranks_holding_that_share_and_saves_modules_whole(tmp_path, dense_vector, base):
    vector, delta = dense_vector

    result = export_lora(vector, tmp_path / "out", energy=0.999999, modules_to_save=["nor*"], base=base, dtype=torch.float64,
                         base_model_name_or_path="org/base")

    s_head = torch.linalg.svdvals(delta["head.weight"].double())
    head_rank = next(k for k in range(1, 4) if float(s_head[:k].square().sum()) >= 0.999999 * float(s_head.square().sum()))
    assert {t.name: t.rank for t in result.tensors} == {"enc.q.weight": 2, "head.weight": head_rank}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["norm"] and result.saved_whole == ["norm.weight"]
    assert config["base_model_name_or_path"] == "org/base" and result.output == tmp_path / "out"
    assert (result.r, result.rank_pattern) == (max(2, head_rank), {} if head_rank == 2 else {"enc\\.q": 2})
    assert config["rank_pattern"] == config["alpha_pattern"] == result.rank_pattern
    assert set(result.left_out) == {"enc.q.bias"}
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    base_norm = load_file(str(base / "model.safetensors"))["norm.weight"]
    assert saved[f"{P}norm.weight"].dtype == torch.float64 and saved[f"{P}enc.q.lora_A.weight"].dtype == torch.float64
    torch.testing.assert_close(saved[f"{P}norm.weight"], (base_norm + delta["norm.weight"]).double(), rtol=0, atol=1e-6)


def test_export_refuses_bad_settings_in_one_line_and_writes_nothing(tmp_path, dense_vector, base):
    vector, _ = dense_vector
    other = _base(tmp_path / "other")
    save_file({**load_file(str(other / "model.safetensors")), "norm.weight": torch.ones(4)}, str(other / "model.safetensors"))
    cases = [
        ({"rank": 1, "energy": 0.5}, "^rank: give exactly one of rank or energy$"),
        ({}, "^rank: give exactly one of rank or energy$"),
        ({"rank": 1, "modules_to_save": ["nothing*"], "base": base}, "^modules_to_save: 'nothing\\*' matches no module of the vector$"),
        ({"rank": 1, "base": other}, "^the base .* \\(fingerprint [0-9a-f]{16}\\) is not the vector's base \\([0-9a-f]{16}\\)$"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TaskVecError, match=message):
            export_lora(vector, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_of_a_vector_whose_matrices_are_all_zero_is_refused(tmp_path, base):
    ft = tmp_path / "ft"
    ft.mkdir()
    tensors = load_file(str(base / "model.safetensors"))
    save_file({**tensors, "norm.weight": tensors["norm.weight"] + 1}, str(ft / "model.safetensors"))
    with pytest.raises(TaskVecError, match="^export-lora: every 2-D weight delta of the vector is zero: there is nothing to factor$"):
        export_lora(TaskVector.extract(base, ft), tmp_path / "out", rank=1)
    assert not (tmp_path / "out").exists()


def test_export_of_a_gpt2_style_base_is_fan_in_fan_out_and_refuses_other_matrices(tmp_path):
    g = torch.Generator().manual_seed(6)
    base, ft = tmp_path / "gpt2", tmp_path / "ft"
    tensors = {"h.0.attn.c_attn.weight": torch.randn(4, 6, generator=g), "wte.weight": torch.randn(10, 4, generator=g), "score.weight": torch.randn(2, 4, generator=g)}
    delta = {n: torch.randn(t.shape, generator=g) for n, t in tensors.items()}
    for folder, values in ((base, tensors), (ft, {n: t + delta[n] for n, t in tensors.items()})):
        folder.mkdir()
        save_file(values, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    vector = TaskVector.extract(base, ft)

    with pytest.raises(TaskVecError, match="^" + re.escape(
            "modules_to_save: module 'score' is not a Conv1D of this GPT-2-style base, whose adapter stores every module as "
            "Conv1D (fan_in_fan_out): name it here to write it whole") + "$"):
        export_lora(vector, tmp_path / "out", rank=4)
    assert not (tmp_path / "out").exists()
    result = export_lora(vector, tmp_path / "out", rank=4, modules_to_save=["score"], base=base)

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["h.0.attn.c_attn", "wte"]
    assert {t.name: t.embedding for t in result.tensors} == {"h.0.attn.c_attn.weight": False, "wte.weight": True}
    back = open_adapter(tmp_path / "out", base)
    for name in ("h.0.attn.c_attn.weight", "wte.weight"):  # full rank: exact
        torch.testing.assert_close(back.get_tensor(name), delta[name], rtol=1e-4, atol=1e-5)
    # told explicitly, the same base's other matrices go in as Linear LoRA
    plain = export_lora(vector, tmp_path / "plain", rank=2, fan_in_fan_out=False)
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    assert [t.name for t in plain.tensors] == ["h.0.attn.c_attn.weight", "score.weight", "wte.weight"]
    # an embedding is PEFT's embedding LoRA either way: delta = (B_e @ A_e).T, A_e (r, num_embeddings), B_e (dim, r)
    for folder, r in ((tmp_path / "out", 4), (tmp_path / "plain", 2)):
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert saved[f"{P}wte.lora_embedding_A"].shape == (r, 10) and saved[f"{P}wte.lora_embedding_B"].shape == (4, r)
        assert not any(k.startswith(f"{P}wte.lora_A") or k.startswith(f"{P}wte.lora_B") for k in saved)
    saved = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert saved[f"{P}score.lora_A.weight"].shape == (2, 4) and saved[f"{P}score.lora_B.weight"].shape == (2, 2)


def test_export_never_writes_over_an_output_or_its_own_base_unless_told(tmp_path, dense_vector, base):
    vector, _ = dense_vector
    export_lora(vector, tmp_path / "out", rank=1)
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TaskVecError, match="already exists"):
        export_lora(vector, tmp_path / "out", rank=2)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before
    export_lora(vector, tmp_path / "out", rank=2, overwrite=True)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
    vector.save(tmp_path / "tv.safetensors")  # read back, the vector names no base file: only `base` does
    saved = TaskVector.load(tmp_path / "tv.safetensors")
    with pytest.raises(TaskVecError, match=re.escape(f"{base}: the output is the input {base}; writing it would destroy")):
        export_lora(saved, base, rank=1, modules_to_save=["norm"], base=base, overwrite=True)
    assert open_checkpoint(base).fingerprint() == vector.base_fingerprint


def test_export_of_a_vector_without_matrices_is_refused_in_one_line(tmp_path, dense_vector, base):
    norms = TaskVector.extract(base, tmp_path / "ft", include=["norm.*", "enc.q.bias"])
    with pytest.raises(TaskVecError, match="^export-lora: the vector has no 2-D weight tensor to factor into a LoRA adapter$"):
        export_lora(norms, tmp_path / "out", rank=1)
    assert not (tmp_path / "out").exists()


def test_a_float16_vector_is_factored_in_float32_and_a_small_left_out_tensor_is_listed(tmp_path):
    g = torch.Generator().manual_seed(8)
    base, ft = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    tensors = {"m.weight": torch.randn(5, 3, generator=g).half(), "m.bias": torch.randn(5, generator=g).half()}
    delta = {"m.weight": torch.randn(5, 3, generator=g).half(), "m.bias": torch.full((5,), 0.125).half()}  # |bias|^2 = 0.078
    save_file(tensors, str(base))
    save_file({n: t + delta[n] for n, t in tensors.items()}, str(ft))
    vector = TaskVector.extract(base, ft)

    result = export_lora(vector, tmp_path / "out", rank=3)

    weight = vector.get_tensor("m.weight", torch.float32).double()
    bias_sq = float(vector.get_tensor("m.bias", torch.float32).double().square().sum())
    assert result.left_out == pytest.approx({"m.bias": bias_sq / (float(weight.square().sum()) + bias_sq)})
    back = open_adapter(tmp_path / "out", base).get_tensor("m.weight").double()
    torch.testing.assert_close(back, weight, rtol=1e-4, atol=1e-5)  # rank 3 of a 5 x 3 matrix: exact


def test_an_adapter_s_vector_names_its_folder_in_errors_and_holds_its_base_as_an_input(tmp_path, base):
    a, b = _factors(2)
    folder = _adapter(tmp_path / "nan", {"r": 2}, {f"{P}enc.q.lora_A.weight": a, f"{P}enc.q.lora_B.weight": b.index_fill(0, torch.tensor([1]), float("nan"))})
    with _one_line(f"left factor of tensor 'enc.q.weight' of {folder} holds NaN or Inf values"):  # left: B (out, r)
        open_adapter(folder, base).check_finite()
    good, _, _ = _q_adapter(tmp_path, {})
    vector = TaskVector.load(good, base=base)
    before = (base / "model.safetensors").read_bytes()
    with pytest.raises(TaskVecError, match=re.escape(f"{base}: the output is the input {base}; writing it would destroy")):
        export_lora(vector, base, rank=1, overwrite=True)
    assert (base / "model.safetensors").read_bytes() == before
