"""The YAML merge recipe: what it accepts, how it refuses, and what running it produces.

Every input is a real safetensors file written with ``safetensors.torch.save_file``
in ``tmp_path``; expected tensors are computed with plain torch from those files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mlflow_taskvec.recipe as recipe_module
from mlflow_taskvec import TaskVecError, TaskVector, open_checkpoint
from mlflow_taskvec.compose import compose_to
from mlflow_taskvec.recipe import load_recipe, parse_recipe
from small_models import INT_BUFFER, SHAPES, base_state, finetune_state
from test_methods import reference_merge

# -- inputs -----------------------------------------------------------------------

@pytest.fixture
def models(tmp_path) -> SimpleNamespace:
    """``models/`` holding base.safetensors and fine-tunes a, b, c of it."""
    folder = tmp_path / "models"
    folder.mkdir()
    base = base_state(0)
    save_file(base, str(folder / "base.safetensors"))
    for i, task in enumerate("abc"):
        save_file(finetune_state(base, 100 + i), str(folder / f"{task}.safetensors"))
    return SimpleNamespace(folder=folder, base=folder / "base.safetensors")


def task_delta(models, task: str) -> dict[str, torch.Tensor]:
    """fine-tune minus base, over the floating-point tensors, read from the files."""
    base, ft = load_file(str(models.base)), load_file(str(models.folder / f"{task}.safetensors"))
    return {n: ft[n] - base[n] for n in SHAPES}


def save_vector(models, task: str) -> Path:
    path = models.folder / f"{task}.tv.safetensors"
    TaskVector.extract(models.base, models.folder / f"{task}.safetensors", task=task).save(path)
    return path


def write_recipe(folder: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
    return path


def compose(models, data: dict, output: str = "merged.safetensors"):
    """Write ``data`` (plus ``output``) as a recipe next to the models and run it."""
    path = write_recipe(models.folder, {**data, "output": output})
    recipe = load_recipe(path)
    result = compose_to(recipe)
    tensors = load_file(str(result.output)) if result.output.is_file() else None
    return recipe, result, tensors


def assert_composite(actual: dict[str, torch.Tensor], models, expected_delta: dict[str, torch.Tensor], scale: float):
    """``actual == base + scale * expected_delta`` on float tensors; buffers copied unchanged."""
    base = load_file(str(models.base))
    assert set(actual) == set(base)
    for name in SHAPES:
        torch.testing.assert_close(actual[name], base[name] + scale * expected_delta[name], rtol=1e-6, atol=1e-6)
    assert torch.equal(actual[INT_BUFFER], base[INT_BUFFER])


VALID = "base: base.safetensors\nvectors:\n  - vector: a.safetensors\n"


def recipe_from_text(tmp_path: Path, text: str) -> "recipe_module.Recipe":
    path = tmp_path / "recipe.yaml"
    path.write_text(text, "utf-8")
    return load_recipe(path)


# -- parsing ----------------------------------------------------------------------


def test_minimal_recipe_gets_the_documented_defaults(tmp_path):
    recipe = recipe_from_text(tmp_path, VALID)

    assert recipe.base == "base.safetensors"
    assert recipe.method == "task_arithmetic"
    assert recipe.scale == 1.0
    assert recipe.params == {}
    assert recipe.dtype is None
    assert recipe.compute_dtype == "float32"
    assert recipe.max_shard_size is None
    assert recipe.output is None
    assert recipe.allow_nonfinite is False
    assert [(e.vector, e.finetuned, e.weight) for e in recipe.vectors] == [("a.safetensors", None, 1.0)]


@pytest.mark.parametrize(
    "method, params, validated",
    [
        ("task_arithmetic", {}, {}),
        ("ties", {"density": 0.2}, {"density": 0.2}),
        ("magnitude_prune", {"density": 1}, {"density": 1.0}),
        ("dare_linear", {"density": 0.5, "seed": 7}, {"density": 0.5, "seed": 7}),
        ("dare_ties", {"density": 0.5}, {"density": 0.5, "seed": 0}),
    ],
)
def test_each_method_is_accepted_with_its_parameters(tmp_path, method, params, validated):
    text = yaml.safe_dump({"base": "base", "method": method, "params": params, "vectors": [{"finetuned": "a"}]})

    recipe = recipe_from_text(tmp_path, text)

    assert recipe.method == method
    assert recipe.params == validated


def test_negative_weight_is_read_as_negation(tmp_path):
    recipe = recipe_from_text(tmp_path, "base: base\nvectors:\n  - finetuned: toxic\n    weight: -1.0\n")

    assert recipe.vectors[0].weight == -1.0


def test_analogy_recipe_keeps_its_entries_and_weights_in_order(tmp_path):
    text = (
        "base: base\n"
        "vectors:\n"
        "  - {vector: c.tv.safetensors, weight: 1}\n"
        "  - {vector: b.tv.safetensors, weight: 1}\n"
        "  - {vector: a.tv.safetensors, weight: -1}\n"
    )

    recipe = recipe_from_text(tmp_path, text)

    assert [(e.ref, e.weight) for e in recipe.vectors] == [
        ("c.tv.safetensors", 1.0),
        ("b.tv.safetensors", 1.0),
        ("a.tv.safetensors", -1.0),
    ]


def test_example_in_the_module_docstring_is_a_valid_recipe(tmp_path):
    example = re.search(r"```yaml\n(.*?)```", recipe_module.__doc__, re.S).group(1)

    recipe = recipe_from_text(tmp_path, example)

    assert recipe.method == "ties"
    assert recipe.scale == 0.8
    assert recipe.params["density"] == 0.2
    assert [(e.vector, e.finetuned, e.weight) for e in recipe.vectors] == [
        ("./rotate.safetensors", None, 1.0),
        (None, "./flip", -1.0),
    ]
    assert (recipe.dtype, recipe.compute_dtype, recipe.max_shard_size) == ("bfloat16", "float32", "2GB")


def test_dtype_aliases_are_normalised_to_torch_names(tmp_path):
    recipe = recipe_from_text(tmp_path, VALID + "dtype: bf16\ncompute_dtype: fp64\n")

    assert (recipe.dtype, recipe.compute_dtype) == ("bfloat16", "float64")


# -- validation: one line naming the field, the value and why ------------------------------

INVALID = {
    "unknown method": (VALID + "method: tiez\n", ["method", "'tiez'", "unknown merge method", "ties"]),
    "density zero": (VALID + "method: ties\nparams: {density: 0}\n", ["params.density", "0", "(0, 1]"]),
    "density above one": (VALID + "method: ties\nparams: {density: 1.5}\n", ["params.density", "1.5", "(0, 1]"]),
    "density negative": (VALID + "method: dare_linear\nparams: {density: -0.1}\n", ["params.density", "-0.1", "(0, 1]"]),
    "density missing": (VALID + "method: ties\n", ["'ties'", "needs parameter 'density'"]),
    "parameter the method does not take": (
        VALID + "method: ties\nparams: {density: 0.5, seed: 1}\n",
        ["'ties'", "no parameter 'seed'"],
    ),
    "weight is text": (
        "base: base\nvectors:\n  - vector: a\n    weight: abc\n",
        ["vectors[0].weight", "'abc'", "not a number"],
    ),
    "weight is a boolean": (
        "base: base\nvectors:\n  - vector: a\n    weight: true\n",
        ["vectors[0].weight", "True", "not a number"],
    ),
    "scale is text": (VALID + "scale: big\n", ["scale", "'big'", "not a number"]),
    "base missing": ("vectors:\n  - vector: a\n", ["base", "required field is missing"]),
    "vectors empty": ("base: base\nvectors: []\n", ["vectors", "empty"]),
    "entry with both vector and finetuned": (
        VALID + "  - vector: b\n    finetuned: b\n",
        ["vectors[1]", "exactly one of 'vector' or 'finetuned'"],
    ),
    "entry with neither vector nor finetuned": (
        VALID + "  - weight: 0.5\n",
        ["vectors[1]", "exactly one of 'vector' or 'finetuned'"],
    ),
    "unknown top-level field": (VALID + "scael: 0.5\n", ["scael", "unknown field"]),
    "unknown field in an entry": (
        "base: base\nvectors:\n  - vector: a\n    wieght: 2\n",
        ["vectors[0].wieght", "unknown field"],
    ),
    "dtype not a float type": (VALID + "dtype: int8\n", ["dtype", "'int8'", "not one of", "bfloat16"]),
    "max_shard_size not a size": (VALID + "max_shard_size: huge\n", ["max_shard_size", "'huge'", "not a size"]),
    "max_shard_size not positive": (VALID + "max_shard_size: 0\n", ["max_shard_size", "0", "must be positive"]),
}


@pytest.mark.parametrize("text, fragments", INVALID.values(), ids=INVALID.keys())
def test_invalid_recipe_is_refused_with_one_line_naming_field_value_and_reason(tmp_path, text, fragments):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, "utf-8")

    with pytest.raises(TaskVecError) as info:
        load_recipe(path)

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_recipe_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(TaskVecError, match=r"must be a mapping of fields, got list$"):
        recipe_from_text(tmp_path, "- base: base\n- vectors: []\n")


def test_parse_recipe_refuses_a_non_mapping_without_touching_files():
    with pytest.raises(TaskVecError, match=r"^recipe: a recipe must be a mapping of fields, got str$"):
        parse_recipe("base: base")


def test_invalid_yaml_syntax_is_reported_with_its_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("base: base\nmethod: ties\n  params: {density: 0.5}\nvectors: []\n", "utf-8")

    with pytest.raises(TaskVecError) as info:
        load_recipe(path)

    assert str(info.value) == f"{path}: not valid YAML at line 3"


def test_missing_recipe_file_is_reported_by_path(tmp_path):
    path = tmp_path / "nowhere" / "recipe.yaml"

    with pytest.raises(TaskVecError) as info:
        load_recipe(path)

    assert str(info.value) == f"{path}: no such recipe file"


# -- identity -----------------------------------------------------------------------


def test_sha256_is_equal_for_equal_recipes_whatever_their_layout(tmp_path):
    a = recipe_from_text(tmp_path, "base: base\nmethod: ties\nparams: {density: 0.5}\nvectors:\n  - {finetuned: a, weight: 1}\n")
    b = recipe_from_text(
        tmp_path,
        "# the same recipe, written differently\n"
        "vectors:\n  - weight: 1.0\n    finetuned: a\n"
        "params:\n  density: 0.5\n"
        "method: ties\n"
        "base: base\n",
    )

    assert a.sha256() == b.sha256()
    assert a.sha256() == hashlib.sha256(a.canonical_json().encode("utf-8")).hexdigest()


def test_sha256_changes_when_a_weight_changes(tmp_path):
    one = recipe_from_text(tmp_path, "base: base\nvectors:\n  - {finetuned: a, weight: 1.0}\n")
    other = recipe_from_text(tmp_path, "base: base\nvectors:\n  - {finetuned: a, weight: 0.9}\n")

    assert one.sha256() != other.sha256()


def test_sha256_does_not_depend_on_the_output_path(tmp_path):
    here = recipe_from_text(tmp_path, VALID + "output: ./here.safetensors\n")
    there = recipe_from_text(tmp_path, VALID + "output: /elsewhere/there\n")
    nowhere = recipe_from_text(tmp_path, VALID)

    assert here.sha256() == there.sha256() == nowhere.sha256()


# -- running: the composite equals the arithmetic the recipe describes ------------------------


def test_task_arithmetic_recipe_adds_the_scaled_weighted_sum_of_task_vectors(models):
    _, result, out = compose(
        models,
        {
            "base": "base.safetensors",
            "scale": 0.8,
            "vectors": [{"finetuned": "a.safetensors", "weight": 0.5}, {"finetuned": "b.safetensors", "weight": 2.0}],
        },
    )

    ta, tb = task_delta(models, "a"), task_delta(models, "b")
    assert_composite(out, models, {n: 0.5 * ta[n] + 2.0 * tb[n] for n in SHAPES}, scale=0.8)
    assert (result.method, result.scale, result.weights) == ("task_arithmetic", 0.8, [0.5, 2.0])


def test_negative_weight_subtracts_the_task(models):
    _, _, out = compose(models, {"base": "base.safetensors", "scale": 0.7, "vectors": [{"finetuned": "a.safetensors", "weight": -1}]})

    ta = task_delta(models, "a")
    assert_composite(out, models, {n: -ta[n] for n in SHAPES}, scale=0.7)


def test_analogy_recipe_gives_c_plus_b_minus_a(models):
    for task in "abc":
        save_vector(models, task)

    _, _, out = compose(
        models,
        {
            "base": "base.safetensors",
            "scale": 0.6,
            "vectors": [
                {"vector": "c.tv.safetensors", "weight": 1},
                {"vector": "b.tv.safetensors", "weight": 1},
                {"vector": "a.tv.safetensors", "weight": -1},
            ],
        },
    )

    ta, tb, tc = (task_delta(models, t) for t in "abc")
    assert_composite(out, models, {n: tc[n] + tb[n] - ta[n] for n in SHAPES}, scale=0.6)


def test_saved_vector_and_its_finetune_give_the_same_composite(models):
    save_vector(models, "a")

    _, _, from_vector = compose(models, {"base": "base.safetensors", "vectors": [{"vector": "a.tv.safetensors"}]}, "v.safetensors")
    _, _, from_finetune = compose(models, {"base": "base.safetensors", "vectors": [{"finetuned": "a.safetensors"}]}, "f.safetensors")

    assert from_vector.keys() == from_finetune.keys()
    for name in from_vector:
        assert torch.equal(from_vector[name], from_finetune[name])


# What each method computes is specified in test_methods.py, whose float64 reference of each
# formula (plain torch ops on whole tensors) gives here what a recipe's composite must be.


@pytest.mark.parametrize(
    "method, params",
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3}),
        ("magnitude_prune", {"density": 0.6}),
        ("dare_linear", {"density": 0.4, "seed": 11}),
        ("dare_ties", {"density": 0.7, "seed": 5}),
    ],
)
def test_recipe_composes_its_method_s_formula_with_its_parameters_weights_and_scale(models, method, params):
    weights = [1.0, 0.5, -0.25]
    _, _, out = compose(
        models,
        {
            "base": "base.safetensors",
            "method": method,
            "scale": 0.75,
            "params": params,
            "vectors": [{"finetuned": f"{t}.safetensors", "weight": w} for t, w in zip("abc", weights)],
        },
    )

    base = load_file(str(models.base))
    finetunes = [load_file(str(models.folder / f"{t}.safetensors")) for t in "abc"]
    expected = reference_merge(base, finetunes, weights, method, scale=0.75, params=params, compute=torch.float64)
    assert out.keys() == expected.keys()
    for name in expected:
        assert out[name].dtype == expected[name].dtype, name
        torch.testing.assert_close(out[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert torch.equal(out[INT_BUFFER], base[INT_BUFFER])


def test_output_dtype_applies_to_floating_point_tensors_only(models):
    _, _, out = compose(models, {"base": "base.safetensors", "dtype": "bfloat16", "vectors": [{"finetuned": "a.safetensors"}]})

    assert {out[n].dtype for n in SHAPES} == {torch.bfloat16}
    assert out[INT_BUFFER].dtype == torch.int64


def test_recipe_max_shard_size_writes_shards_and_an_index(models):
    _, result, _ = compose(
        models, {"base": "base.safetensors", "max_shard_size": 100, "vectors": [{"finetuned": "a.safetensors"}]}, output="sharded"
    )

    index = json.loads((result.output / "model.safetensors.index.json").read_text("utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    assert set(index["weight_map"]) == set(SHAPES) | {INT_BUFFER}
    assert len(shards) > 1
    assert sorted(p.name for p in result.output.glob("*.safetensors")) == shards
    assert open_checkpoint(result.output).fingerprint() == result.fingerprint


# -- paths ----------------------------------------------------------------------------


def test_relative_references_resolve_against_the_recipe_folder_not_the_cwd(models, tmp_path, monkeypatch):
    path = write_recipe(
        models.folder,
        {"base": "base.safetensors", "vectors": [{"finetuned": "./a.safetensors"}], "output": "merged.safetensors"},
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    result = compose_to(load_recipe(path))

    assert result.output == models.folder / "merged.safetensors"
    assert result.output.is_file()
    assert list(elsewhere.iterdir()) == []


def test_recipe_without_any_output_is_refused(models):
    recipe = load_recipe(write_recipe(models.folder, {"base": "base.safetensors", "vectors": [{"finetuned": "a.safetensors"}]}))

    with pytest.raises(TaskVecError, match=r"^no output: set 'output' in the recipe or pass --output$"):
        compose_to(recipe)


# -- provenance and reproducibility -------------------------------------------------------------


def test_output_records_the_recipe_its_digest_the_method_and_the_base(models):
    recipe, result, _ = compose(
        models,
        {
            "base": "base.safetensors",
            "method": "ties",
            "params": {"density": 0.5},
            "vectors": [{"finetuned": "a.safetensors"}, {"finetuned": "b.safetensors", "weight": -1}],
        },
    )

    meta = open_checkpoint(result.output).metadata()
    recorded = json.loads(meta["taskvec.recipe"])
    assert meta["taskvec.kind"] == "composite"
    assert meta["taskvec.method"] == "ties"
    assert recorded["method"] == "ties"
    assert recorded["params"] == {"density": 0.5}
    assert [v["weight"] for v in recorded["vectors"]] == [1.0, -1.0]
    assert "output" not in recorded
    assert meta["taskvec.recipe_sha256"] == recipe.sha256()
    assert meta["taskvec.recipe_sha256"] == hashlib.sha256(meta["taskvec.recipe"].encode("utf-8")).hexdigest()
    assert meta["taskvec.base_fingerprint"] == open_checkpoint(models.base).fingerprint()
    assert result.fingerprint == open_checkpoint(result.output).fingerprint()


@pytest.mark.parametrize(
    "method, params",
    [("task_arithmetic", {}), ("ties", {"density": 0.4}), ("dare_linear", {"density": 0.5, "seed": 42}), ("dare_ties", {"density": 0.3, "seed": 7})],
)
def test_same_recipe_twice_gives_bit_identical_output(models, method, params):
    data = {
        "base": "base.safetensors",
        "method": method,
        "params": params,
        "vectors": [{"finetuned": "a.safetensors"}, {"finetuned": "c.safetensors", "weight": 0.5}],
    }

    _, first, _ = compose(models, data, output="first.safetensors")
    _, second, _ = compose(models, data, output="second.safetensors")

    assert first.output.read_bytes() == second.output.read_bytes()
    assert first.fingerprint == second.fingerprint


def test_dare_seed_decides_which_entries_are_dropped(models):
    data = {"base": "base.safetensors", "method": "dare_linear", "vectors": [{"finetuned": "a.safetensors"}]}

    _, _, seed1 = compose(models, {**data, "params": {"density": 0.5, "seed": 1}}, output="seed1.safetensors")
    _, _, seed2 = compose(models, {**data, "params": {"density": 0.5, "seed": 2}}, output="seed2.safetensors")

    assert not torch.equal(seed1["model.embed.weight"], seed2["model.embed.weight"])


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_negative_weight_negates_the_task_with_sign_election_methods(models, method):
    _, _, out = compose(
        models,
        {"base": "base.safetensors", "method": method, "params": {"density": 1.0}, "vectors": [{"finetuned": "a.safetensors", "weight": -1}]},
    )

    ta = task_delta(models, "a")
    assert_composite(out, models, {n: -ta[n] for n in SHAPES}, scale=1.0)
