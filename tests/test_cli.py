"""The ``mlflow-taskvec`` command line: extract, compose, inspect, methods.

Driven through click's CliRunner on real safetensors files in ``tmp_path``, and
once end to end as real processes (``python -m`` and the console script).
Bad input always ends the same way: exit code 1, one ``Error: ...`` line on
stderr naming the problem, nothing on stdout and no output or temporary file left.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mlflow_taskvec.cli import main
from small_models import INT_BUFFER, SHAPES, base_state, finetune_state
from team_server import skip_or_fail
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.recipe import load_recipe

# about 20 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(20)

# -- inputs -----------------------------------------------------------------------

FLOAT_PARAMS = sum(math.prod(s) for s in SHAPES.values())  # 116
METHOD_NAMES = [
    "task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "consensus_ta", "consensus_ties", "tsv_m", "iso_c", "iso_cts", "slerp",
]


@pytest.fixture
def models(tmp_path) -> SimpleNamespace:
    """``in/`` with base.safetensors and fine-tunes a and b; ``out/`` empty for outputs."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    base = base_state(0)
    save_file(base, str(folder / "base.safetensors"))
    save_file(finetune_state(base, 1), str(folder / "a.safetensors"))
    save_file(finetune_state(base, 2), str(folder / "b.safetensors"))
    return SimpleNamespace(
        root=tmp_path,
        folder=folder,
        out=out,
        base=folder / "base.safetensors",
        a=folder / "a.safetensors",
        b=folder / "b.safetensors",
        base_sd=base,
    )


def write_recipe(folder: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
    return path


def variant_of(source: Path, target: Path, edit) -> Path:
    """A copy of the checkpoint at ``source`` with ``edit(state_dict)`` applied."""
    state = load_file(str(source))
    edit(state)
    save_file(state, str(target))
    return target


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def lines_of(result) -> list[str]:
    return result.stdout.splitlines()


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if ".partial-" in p.name or ".old-" in p.name)


def assert_ok(result) -> None:
    assert result.exit_code == 0, result.output


def assert_refused(result, root: Path, *fragments: str) -> str:
    """Exit 1 through a clean error (no traceback), one 'Error: ...' line naming the problem."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert leftovers(root) == []
    return lines[0]


def delta(models, ft: Path) -> dict[str, torch.Tensor]:
    base, tuned = load_file(str(models.base)), load_file(str(ft))
    return {n: tuned[n] - base[n] for n in SHAPES}


# -- extract ----------------------------------------------------------------------


def test_extract_writes_finetuned_minus_base_and_prints_its_fingerprint(models):
    out = models.out / "a.tv.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", models.a, "--output", out, "--task", "rotate")

    assert_ok(result)
    vector = load_file(str(out))
    assert set(vector) == set(SHAPES)
    for name, expected in delta(models, models.a).items():
        assert torch.equal(vector[name], expected)
    assert lines_of(result) == [
        f"task vector: {out}",
        f"tensors: {len(SHAPES)}  parameters: {FLOAT_PARAMS}  skipped: 1",
        f"base fingerprint: {open_checkpoint(models.base).fingerprint()}",
        f"fingerprint: {open_checkpoint(out).fingerprint()}",
    ]
    meta = open_checkpoint(out).metadata()
    assert (meta["taskvec.kind"], meta["taskvec.task"], json.loads(meta["taskvec.skipped"])) == ("task_vector", "rotate", [INT_BUFFER])


def test_extract_quiet_prints_nothing_but_still_writes(models):
    out = models.out / "a.tv.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", models.a, "--output", out, "--quiet")

    assert_ok(result)
    assert result.stdout == ""
    assert out.is_file()


def test_extract_include_keeps_only_tensors_matching_the_globs(models):
    out = models.out / "layers.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", models.a, "-o", out, "--include", "model.layers.*", "--include", "model.norm.*")

    assert_ok(result)
    assert sorted(load_file(str(out))) == sorted(n for n in SHAPES if n.startswith(("model.layers.", "model.norm.")))


def test_extract_exclude_leaves_out_tensors_matching_the_globs(models):
    out = models.out / "no_mlp.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", models.a, "-o", out, "--exclude", "*.mlp.*", "--exclude", "model.embed.*")

    assert_ok(result)
    assert sorted(load_file(str(out))) == ["model.layers.0.attn.weight", "model.layers.1.attn.weight", "model.norm.weight"]
    assert "skipped: 4" in result.stdout  # the int buffer and three excluded tensors


def test_extract_max_shard_size_writes_shards_and_an_index_with_the_same_content(models):
    single, sharded = models.out / "a.tv.safetensors", models.out / "a_sharded"
    assert_ok(cli("extract", "--base", models.base, "--finetuned", models.a, "-o", single))

    result = cli("extract", "--base", models.base, "--finetuned", models.a, "-o", sharded, "--max-shard-size", "150B")

    assert_ok(result)
    index = json.loads((sharded / "model.safetensors.index.json").read_text("utf-8"))
    shard_names = sorted(set(index["weight_map"].values()))
    assert set(index["weight_map"]) == set(SHAPES)
    assert len(shard_names) > 1
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == shard_names
    assert shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    fingerprint = open_checkpoint(single).fingerprint()
    assert open_checkpoint(sharded).fingerprint() == fingerprint  # content, not layout
    assert f"fingerprint: {fingerprint}" in lines_of(result)


# -- compose ----------------------------------------------------------------------


def test_compose_writes_the_recipe_composite_to_the_output_option(models):
    recipe = write_recipe(
        models.folder,
        {"base": "base.safetensors", "scale": 0.5, "vectors": [{"finetuned": "a.safetensors"}, {"finetuned": "b.safetensors", "weight": -1}]},
    )
    out = models.out / "merged.safetensors"

    result = cli("compose", recipe, "--output", out)

    assert_ok(result)
    merged, base = load_file(str(out)), models.base_sd
    ta, tb = delta(models, models.a), delta(models, models.b)
    for name in SHAPES:
        torch.testing.assert_close(merged[name], base[name] + 0.5 * (ta[name] - tb[name]), rtol=1e-6, atol=1e-6)
    assert torch.equal(merged[INT_BUFFER], base[INT_BUFFER])
    printed = lines_of(result)
    assert printed[0] == f"composite: {out}"
    assert printed[1].startswith("method: task_arithmetic  scale: 0.5  weights: [1.0, -1.0]")
    assert f"recipe sha256: {load_recipe(recipe).sha256()}" in printed
    assert f"fingerprint: {open_checkpoint(out).fingerprint()}" in printed


def test_compose_resolves_recipe_paths_against_its_folder_from_another_cwd(models, monkeypatch):
    write_recipe(models.folder, {"base": "./base.safetensors", "vectors": [{"finetuned": "a.safetensors"}], "output": "merged.safetensors"})
    elsewhere = models.root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    result = cli("compose", Path("..") / "in" / "recipe.yaml")

    assert_ok(result)
    assert (models.folder / "merged.safetensors").is_file()
    assert list(elsewhere.iterdir()) == []


def test_compose_recipe_max_shard_size_writes_shards_and_an_index(models):
    recipe = write_recipe(models.folder, {"base": "base.safetensors", "max_shard_size": "100B", "vectors": [{"finetuned": "a.safetensors"}]})
    out = models.out / "merged"

    assert_ok(cli("compose", recipe, "-o", out))

    index = json.loads((out / "model.safetensors.index.json").read_text("utf-8"))
    assert set(index["weight_map"]) == set(SHAPES) | {INT_BUFFER}
    assert len(set(index["weight_map"].values())) > 1
    assert open_checkpoint(out).metadata()["taskvec.kind"] == "composite"


def test_compose_from_an_hf_style_base_directory_carries_config_and_tokenizer(models):
    base_dir, ft_dir = models.folder / "base_model", models.folder / "ft_model"
    config, tokenizer = '{"model_type": "tiny", "hidden_size": 4}', '{"version": "1.0", "model": {"type": "BPE"}}'
    for directory, source in ((base_dir, models.base), (ft_dir, models.a)):
        directory.mkdir()
        shutil.copy(source, directory / "model.safetensors")
        (directory / "config.json").write_text(config, "utf-8")
        (directory / "tokenizer.json").write_text(tokenizer, "utf-8")
    recipe = write_recipe(models.folder, {"base": "base_model", "vectors": [{"finetuned": "ft_model"}]})
    out = models.out / "composite"

    assert_ok(cli("compose", recipe, "--output", out))

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]  # README.md: its model card
    assert (out / "config.json").read_text("utf-8") == config
    assert (out / "tokenizer.json").read_text("utf-8") == tokenizer
    merged, finetuned = load_file(str(out / "model.safetensors")), load_file(str(models.a))
    for name in SHAPES:
        torch.testing.assert_close(merged[name], finetuned[name], rtol=1e-6, atol=1e-6)  # base + 1.0 * (ft - base)


# -- inspect ----------------------------------------------------------------------


def _norms(path: Path) -> dict[str, float]:
    return {n: float(t.double().norm()) for n, t in load_file(str(path)).items() if t.is_floating_point()}


def test_inspect_prints_tensors_parameters_dtypes_fingerprint_and_largest_norms(models):
    result = cli("inspect", models.base, "--top", "3")

    assert_ok(result)
    norms = _norms(models.base)
    largest = sorted(norms, key=norms.get, reverse=True)[:3]
    printed = lines_of(result)
    assert printed[:8] == [
        f"source: {models.base}",
        "kind: checkpoint",
        f"tensors: {len(SHAPES) + 1}",
        f"parameters: {FLOAT_PARAMS + 8}",
        f"dtypes: float32 ({FLOAT_PARAMS}), int64 (8)",
        f"fingerprint: {open_checkpoint(models.base).fingerprint()}",
        f"l2 norm: {math.sqrt(sum(v * v for v in norms.values())):.6g}",
        "largest 3 tensors by l2 norm:",
    ]
    rows = [line.split() for line in printed[8:]]
    assert [name for name, _ in rows] == largest
    assert [float(value) for _, value in rows] == pytest.approx([norms[n] for n in largest], rel=1e-5)


def test_inspect_layers_lists_the_l2_norm_of_each_layer(models):
    result = cli("inspect", models.base, "--top", "0", "--layers")

    assert_ok(result)
    norms = _norms(models.base)
    groups = {
        "model.embed": norms["model.embed.weight"],
        "model.layers.0": math.hypot(norms["model.layers.0.attn.weight"], norms["model.layers.0.mlp.weight"]),
        "model.layers.1": math.hypot(norms["model.layers.1.attn.weight"], norms["model.layers.1.mlp.weight"]),
        "model.norm": norms["model.norm.weight"],
    }
    printed = lines_of(result)
    section = printed[printed.index("l2 norm by layer:") + 1 :]
    assert {row.split()[0]: float(row.split()[1]) for row in section} == pytest.approx(groups, rel=1e-5)
    assert not any(line.startswith("largest") for line in printed)


def test_inspect_json_output_parses_and_describes_a_task_vector(models):
    vector = models.out / "a.tv.safetensors"
    assert_ok(cli("extract", "--base", models.base, "--finetuned", models.a, "-o", vector, "--task", "rotate"))

    result = cli("inspect", vector, "--format", "json", "--top", "2", "--layers")

    assert_ok(result)
    data = json.loads(result.stdout)
    norms = _norms(vector)
    assert data["source"] == str(vector)
    assert data["kind"] == "task_vector"
    assert data["fingerprint"] == open_checkpoint(vector).fingerprint()
    assert (data["num_tensors"], data["num_parameters"], data["dtypes"]) == (len(SHAPES), FLOAT_PARAMS, {"float32": FLOAT_PARAMS})
    assert data["l2_norm"] == pytest.approx(math.sqrt(sum(v * v for v in norms.values())), rel=1e-9)
    assert [e["name"] for e in data["largest"]] == sorted(norms, key=norms.get, reverse=True)[:2]
    assert set(data["layers"]) == {"model.embed", "model.layers.0", "model.layers.1", "model.norm"}
    assert data["metadata"]["taskvec.task"] == "rotate"
    assert data["metadata"]["taskvec.base_fingerprint"] == open_checkpoint(models.base).fingerprint()


def test_inspect_shows_the_provenance_of_a_composite(models):
    recipe = write_recipe(models.folder, {"base": "base.safetensors", "method": "ties", "params": {"density": 0.5}, "vectors": [{"finetuned": "a.safetensors"}]})
    out = models.out / "merged.safetensors"
    assert_ok(cli("compose", recipe, "-o", out))

    result = cli("inspect", out)

    assert_ok(result)
    printed = lines_of(result)
    assert "kind: composite" in printed
    assert "method: ties" in printed
    assert f"recipe_sha256: {load_recipe(recipe).sha256()}" in printed
    assert f"base_fingerprint: {open_checkpoint(models.base).fingerprint()}" in printed


def test_inspect_layers_of_a_checkpoint_without_float_tensors_succeeds(models):
    ints = models.folder / "ints.safetensors"
    save_file({"ids": torch.arange(4)}, str(ints))

    result = cli("inspect", ints, "--layers")

    assert_ok(result)
    assert lines_of(result) == [
        f"source: {ints}",
        "kind: checkpoint",
        "tensors: 1",
        "parameters: 4",
        "dtypes: int64 (4)",
        f"fingerprint: {open_checkpoint(ints).fingerprint()}",
        "l2 norm: 0",
        "l2 norm by layer:",
    ]


# -- methods ----------------------------------------------------------------------


def test_methods_lists_all_fifteen_with_their_paper_and_parameters():
    result = cli("methods")

    assert_ok(result)
    listed = {line.split(":")[0]: line for line in lines_of(result)}
    assert sorted(listed) == sorted(METHOD_NAMES)
    assert listed["task_arithmetic"].endswith("(arXiv 2212.04089; params: none)")
    assert listed["ties"].endswith("(arXiv 2306.01708; params: density)")
    assert listed["dare_ties"].endswith("(arXiv 2311.03099; params: density, seed)")
    assert listed["tsv_m"].endswith("(arXiv 2412.00081; params: exclude)")
    assert listed["iso_cts"].endswith("(arXiv 2502.04959; params: common_fraction, exclude)")
    assert listed["della"].endswith("(arXiv 2406.11617; params: density, epsilon, seed)")
    assert listed["slerp"].endswith("(no arXiv paper; params: t)")


# -- bad input: exit 1, one line, nothing left behind ---------------------------------------


def test_missing_input_path_is_refused(models):
    out = models.out / "v.safetensors"
    missing = models.folder / "nope.safetensors"

    result = cli("extract", "--base", missing, "--finetuned", models.a, "-o", out)

    assert_refused(result, models.root, str(missing), "no such file or directory")
    assert not out.exists()


def test_inspect_of_a_missing_path_is_refused(models):
    missing = models.folder / "nope"

    assert_refused(cli("inspect", missing), models.root, str(missing), "no such file or directory")


def test_compose_of_a_missing_recipe_is_refused(models):
    missing = models.folder / "nope.yaml"

    assert_refused(cli("compose", missing, "-o", models.out / "m.safetensors"), models.root, str(missing), "no such recipe file")


def test_truncated_safetensors_file_is_refused(models):
    data = models.a.read_bytes()
    truncated = models.folder / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    out = models.out / "v.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", truncated, "-o", out)

    assert_refused(result, models.root, str(truncated), "truncated safetensors file")
    assert not out.exists()


def _raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


IMPOSSIBLE_HEADERS = {
    "header length beyond any real header": (
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 1 << 40, "corrupt safetensors header (claims a 1099511627776-byte header)"
    ),
    "tensor ends beyond the file": (
        {"w": {"dtype": "F32", "shape": [1 << 20, 1024], "data_offsets": [0, 1 << 32]}}, None, "truncated safetensors file (tensor 'w' ends at byte 4294967296"
    ),
    "shape disagrees with offsets": (
        {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, None, "needs 4000000 bytes, offsets span 16"
    ),
}


@pytest.mark.parametrize("header, header_len, fragment", IMPOSSIBLE_HEADERS.values(), ids=IMPOSSIBLE_HEADERS.keys())
def test_header_claiming_impossible_sizes_is_refused(models, header, header_len, fragment):
    corrupt = _raw_safetensors(models.folder / "corrupt.safetensors", header, bytes(16), header_len)

    result = cli("inspect", corrupt)

    assert_refused(result, models.root, str(corrupt), fragment)


def test_base_and_finetune_with_different_tensor_names_are_refused(models):
    extra = variant_of(models.a, models.folder / "extra.safetensors", lambda sd: sd.update({"lm_head.weight": torch.ones(2, 4)}))
    out = models.out / "v.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", extra, "-o", out)

    assert_refused(result, models.root, "'lm_head.weight'", f"in the fine-tune {extra} but not in the base {models.base}")
    assert not out.exists()


def test_base_and_finetune_with_different_shapes_are_refused(models):
    wider = variant_of(models.a, models.folder / "wider.safetensors", lambda sd: sd.update({"model.norm.weight": torch.ones(5)}))
    out = models.out / "v.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", wider, "-o", out)

    assert_refused(result, models.root, "tensor 'model.norm.weight' has shape [4] in the base but [5] in the fine-tune")
    assert not out.exists()


def test_recipe_mixing_vectors_from_different_bases_is_refused(models):
    other_base = models.folder / "other_base.safetensors"
    save_file(base_state(7), str(other_base))
    other_ft = models.folder / "other_ft.safetensors"
    save_file(finetune_state(base_state(7), 8), str(other_ft))
    assert_ok(cli("extract", "--base", models.base, "--finetuned", models.a, "-o", models.folder / "a.tv.safetensors"))
    assert_ok(cli("extract", "--base", other_base, "--finetuned", other_ft, "-o", models.folder / "x.tv.safetensors"))
    recipe = write_recipe(models.folder, {"base": "base.safetensors", "vectors": [{"vector": "a.tv.safetensors"}, {"vector": "x.tv.safetensors"}]})
    out = models.out / "merged.safetensors"

    result = cli("compose", recipe, "-o", out)

    assert_refused(result, models.root, "vectors[1] was extracted from a different base")
    assert not out.exists()


def _with_nan(models) -> Path:
    def poison(sd):
        sd["model.layers.1.mlp.weight"][2, 3] = float("nan")

    return variant_of(models.a, models.folder / "nan.safetensors", poison)


def test_extract_refuses_nan_in_a_finetune(models):
    nan = _with_nan(models)
    out = models.out / "v.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", nan, "-o", out)

    assert_refused(result, models.root, f"tensor 'model.layers.1.mlp.weight' of {nan}", "NaN")
    assert not out.exists()


def test_extract_accepts_nan_with_allow_nonfinite(models):
    out = models.out / "v.safetensors"

    result = cli("extract", "--base", models.base, "--finetuned", _with_nan(models), "-o", out, "--allow-nonfinite")

    assert_ok(result)
    poisoned = load_file(str(out))["model.layers.1.mlp.weight"]
    assert torch.isnan(poisoned).nonzero().tolist() == [[2, 3]]


def test_compose_refuses_nan_in_a_finetune(models):
    nan = _with_nan(models)
    recipe = write_recipe(models.folder, {"base": "base.safetensors", "vectors": [{"finetuned": nan.name}]})
    out = models.out / "merged.safetensors"

    result = cli("compose", recipe, "-o", out)

    assert_refused(result, models.root, f"tensor 'model.layers.1.mlp.weight' of {nan}", "NaN")
    assert not out.exists()


def test_compose_accepts_nan_when_the_recipe_allows_nonfinite(models):
    nan = _with_nan(models)
    recipe = write_recipe(models.folder, {"base": "base.safetensors", "allow_nonfinite": True, "vectors": [{"finetuned": nan.name}]})
    out = models.out / "merged.safetensors"

    assert_ok(cli("compose", recipe, "-o", out))

    assert torch.isnan(load_file(str(out))["model.layers.1.mlp.weight"]).nonzero().tolist() == [[2, 3]]


BAD_RECIPES = {
    "unknown method": ({"method": "tiez"}, [{"finetuned": "a.safetensors"}], ["method: unknown merge method 'tiez'"]),
    "density zero": ({"method": "ties", "params": {"density": 0}}, [{"finetuned": "a.safetensors"}], ["params.density: 0 ", "(0, 1]"]),
    "density above one": ({"method": "ties", "params": {"density": 1.5}}, [{"finetuned": "a.safetensors"}], ["params.density: 1.5 ", "(0, 1]"]),
    "density negative": ({"method": "dare_ties", "params": {"density": -0.1}}, [{"finetuned": "a.safetensors"}], ["params.density: -0.1 ", "(0, 1]"]),
    "weight is text": ({}, [{"finetuned": "a.safetensors", "weight": "abc"}], ["vectors[0].weight: 'abc' is not a number"]),
    "weight is a boolean": ({}, [{"finetuned": "a.safetensors", "weight": True}], ["vectors[0].weight: True is not a number"]),
    "no vectors": ({}, [], ["vectors: the list is empty"]),
}


@pytest.mark.parametrize("fields, vectors, fragments", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_compose_refuses_an_invalid_recipe(models, fields, vectors, fragments):
    recipe = write_recipe(models.folder, {"base": "base.safetensors", **fields, "vectors": vectors})
    out = models.out / "merged.safetensors"

    result = cli("compose", recipe, "-o", out)

    assert_refused(result, models.root, f"{recipe}: ", *fragments)
    assert not out.exists()


def test_existing_output_is_refused_and_left_untouched(models):
    out = models.out / "v.safetensors"
    out.write_bytes(b"precious")

    result = cli("extract", "--base", models.base, "--finetuned", models.a, "-o", out)

    assert_refused(result, models.root, f"{out}: output already exists", "--overwrite")
    assert out.read_bytes() == b"precious"


def test_overwrite_replaces_an_existing_output_file(models):
    out = models.out / "v.safetensors"
    out.write_bytes(b"precious")

    result = cli("extract", "--base", models.base, "--finetuned", models.a, "-o", out, "--overwrite")

    assert_ok(result)
    assert torch.equal(load_file(str(out))["model.norm.weight"], delta(models, models.a)["model.norm.weight"])
    assert leftovers(models.root) == []


def test_overwrite_replaces_an_existing_output_directory_and_its_old_content_is_gone(models):
    out = models.out / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old", "utf-8")
    (out / "model.safetensors").write_bytes(b"old weights")
    recipe = write_recipe(models.folder, {"base": "base.safetensors", "vectors": [{"finetuned": "a.safetensors"}]})
    assert_refused(cli("compose", recipe, "-o", out), models.root, "output already exists")

    result = cli("compose", recipe, "-o", out, "--overwrite")

    assert_ok(result)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    assert open_checkpoint(out).metadata()["taskvec.kind"] == "composite"
    assert leftovers(models.root) == []


def test_missing_required_option_is_a_usage_error(models):
    result = cli("extract", "--finetuned", models.a, "-o", models.out / "v.safetensors")

    assert result.exit_code == 2
    assert "Missing option '--base'" in result.stderr
    assert list(models.out.iterdir()) == []


# -- real processes -----------------------------------------------------------------


def console_script() -> str:
    found = shutil.which("mlflow-taskvec", path=str(Path(sys.executable).parent)) or shutil.which("mlflow-taskvec")
    if found is None:
        skip_or_fail("the mlflow-taskvec console script is not installed (pip install -e .)")
    return found


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_extract_compose_inspect_end_to_end_as_real_processes(models):
    script = console_script()

    extracted = run(sys.executable, "-m", "mlflow_taskvec.cli", "extract", "--base", "base.safetensors", "--finetuned", "a.safetensors", "-o", "a.tv.safetensors", cwd=models.folder)
    assert extracted.returncode == 0, extracted.stderr
    vector = models.folder / "a.tv.safetensors"
    assert f"fingerprint: {open_checkpoint(vector).fingerprint()}" in extracted.stdout.splitlines()

    write_recipe(models.folder, {"base": "base.safetensors", "scale": 2.0, "vectors": [{"vector": "a.tv.safetensors", "weight": -0.5}], "output": "merged"})
    composed = run(script, "compose", "recipe.yaml", cwd=models.folder)
    assert composed.returncode == 0, composed.stderr
    merged = models.folder / "merged"
    assert f"fingerprint: {open_checkpoint(merged).fingerprint()}" in composed.stdout.splitlines()
    weights = load_file(str(merged / "model.safetensors"))
    for name, t in delta(models, models.a).items():
        torch.testing.assert_close(weights[name], models.base_sd[name] - t, rtol=1e-6, atol=1e-6)

    inspected = run(script, "inspect", "merged", "--format", "json", cwd=models.folder)
    assert inspected.returncode == 0, inspected.stderr
    data = json.loads(inspected.stdout)
    assert (data["kind"], data["fingerprint"], data["num_tensors"]) == ("composite", open_checkpoint(merged).fingerprint(), len(SHAPES) + 1)
    assert data["metadata"]["taskvec.recipe_sha256"] == load_recipe(models.folder / "recipe.yaml").sha256()


def test_failing_real_process_exits_1_with_one_line_on_stderr(models):
    result = run(console_script(), "extract", "--base", "missing.safetensors", "--finetuned", "a.safetensors", "-o", "v.safetensors", cwd=models.folder)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["Error: missing.safetensors: no such file or directory"]
    assert not (models.folder / "v.safetensors").exists()


def test_compose_max_shard_size_option_overrides_the_recipe(models, tmp_path):
    recipe = tmp_path / "shards.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(models.base), "vectors": [{"finetuned": str(models.a)}]}))

    result = cli("compose", recipe, "--output", tmp_path / "sharded", "--max-shard-size", "200B")

    assert_ok(result)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()


def test_compose_refuses_a_malformed_max_shard_size(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(models.base), "vectors": [{"finetuned": str(models.a)}]}))

    result = cli("compose", recipe, "--output", tmp_path / "bad", "--max-shard-size", "lots")

    assert result.exit_code == 1
    assert "--max-shard-size: 'lots' is not a size" in result.output
    assert not (tmp_path / "bad").exists()
