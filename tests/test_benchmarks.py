"""The benchmarks' own pieces that are cheap to check: the tiny Llama shape they are validated on
writes real HF-sharded bf16 checkpoints of the planned shapes, the mergekit comparison's configs
ask both sides for the same merge in the same dtype, and the team-server op says, in one line,
when there is no PostgreSQL to run on. The benchmarks themselves are not run here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_engine  # noqa: E402
import bench_peers  # noqa: E402

from mlflow_taskvec.recipe import parse_recipe  # noqa: E402

# tiny-llama, written out here: hidden, layers, intermediate, query heads, key-value heads, vocab
HIDDEN, LAYERS, INTER, HEADS, KV_HEADS, VOCAB = 256, 2, 688, 8, 2, 1024


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    found = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(found) == set(index["weight_map"])
    return found


def test_the_tiny_llama_shape_writes_hf_sharded_bf16_llamas_of_its_plan(tmp_path, capsys):
    paths = bench_engine.generate_llm(tmp_path, "tiny-llama", seed=0)
    assert [p.name for p in paths] == ["base", "ft1", "ft2", "ft3"]
    kv = HIDDEN // HEADS * KV_HEADS
    layer = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN), "self_attn.v_proj.weight": (kv, HIDDEN),
             "self_attn.o_proj.weight": (HIDDEN, HIDDEN), "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
             "mlp.down_proj.weight": (HIDDEN, INTER), "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,)}
    expected = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                **{f"model.layers.{i}.{name}": shape for i in range(LAYERS) for name, shape in layer.items()}}
    weights = [_tensors(p) for p in paths]
    for folder, tensors in zip(paths, weights):
        assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 4  # 1 MB shards of a 3.9 MB checkpoint
        for shard in shards:  # each shard's tensors within its 1 MB (decimal) budget
            assert sum(tensors[n].numel() * 2 for n, s in index["weight_map"].items() if s == shard) <= 10**6
        config = json.loads((folder / "config.json").read_text())
        assert (config["architectures"], config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (["LlamaForCausalLM"], HIDDEN, LAYERS, INTER)
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"], config["torch_dtype"]) == (HEADS, KV_HEADS, VOCAB, "bfloat16")
    base = weights[0]
    assert base["model.embed_tokens.weight"].float().std().item() == pytest.approx(0.02, rel=0.05)
    assert base["model.norm.weight"].float().mean().item() == pytest.approx(1.0, abs=0.02)
    for ft in weights[1:]:  # a fine-tune is the base plus noise of scale 1e-3, rounded to bf16
        noise = ft["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float()
        assert noise.std().item() == pytest.approx(1e-3, rel=0.05)
    capsys.readouterr()
    assert bench_engine.generate_llm(tmp_path, "tiny-llama", seed=0) == paths  # the same set, not written again
    assert "reusing the checkpoints" in capsys.readouterr().out


def test_the_mergekit_configs_ask_for_our_merge_in_the_checkpoints_dtype(tmp_path):
    folders = [tmp_path / n for n in ("base", "ft1", "ft2", "ft3")]
    for method, normalized in [("task_arithmetic", False), ("breadcrumbs", False), ("ties", True), ("breadcrumbs_ties", True), ("della", True)]:
        theirs, ours = bench_peers.write_configs(tmp_path, folders, method, "bfloat16", "float32")
        config = yaml.safe_load(theirs.read_text())
        assert (config["merge_method"], config["dtype"], config["out_dtype"]) == (method, "float32", "bfloat16")
        assert config["parameters"] == {"lambda": 0.8, "normalize": normalized}
        assert [m["parameters"]["weight"] for m in config["models"]] == [0.5, 0.3, 0.7]
        recipe = parse_recipe(yaml.safe_load(ours.read_text()), "bench recipe")
        assert (recipe.method, recipe.dtype, recipe.scale) == (method, "bfloat16", 0.8)
        their_params = {k: v for k, v in config["models"][0]["parameters"].items() if k != "weight"}
        assert {k: recipe.params[k] for k in their_params} == their_params  # the same density, gamma, epsilon


def test_the_team_server_op_without_postgresql_is_one_line_and_creates_nothing(tmp_path):
    server = bench_engine.TeamServer(tmp_path / "team-server", "postgres@127.0.0.1:1")
    with pytest.raises(bench_engine.ServerUnavailable) as caught:
        server.__enter__()
    assert str(caught.value).startswith("PostgreSQL is not reachable at postgres@127.0.0.1:1: ")
    assert "\n" not in str(caught.value)
    assert server.proc is None and not (tmp_path / "team-server").exists()
