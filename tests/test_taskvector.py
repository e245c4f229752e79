"""TaskVector: extraction, algebra, reductions, application, save/load, and refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlflow_taskvec.engine import MergeResult, TaskVector, open_checkpoint
from mlflow_taskvec.engine.checkpoint import StateDictCheckpoint
from mlflow_taskvec.errors import TaskVecError

FLOAT_NAMES = ["embed.weight", "layers.0.attn.bias", "layers.0.attn.weight", "layers.1.mlp.weight", "norm.weight"]


def delta(models, i, name):
    return models.finetune_sds[i][name].float() - models.base_sd[name].float()


def assert_vector_equals(vector, expected: dict[str, torch.Tensor], **tol):
    assert vector.names == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(vector.get_tensor(name), value.float(), **tol)


@pytest.fixture
def vectors(fp32_models):
    return [TaskVector.extract(fp32_models.base, ft, task=f"task{i}") for i, ft in enumerate(fp32_models.finetunes)]


# -- extraction ------------------------------------------------------------------------


def test_extract_is_finetune_minus_base_over_floating_tensors(fp32_models):
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0])
    assert_vector_equals(vector, {n: delta(fp32_models, 0, n) for n in FLOAT_NAMES}, rtol=0, atol=0)


def test_extract_skips_integer_and_bool_buffers_and_reports_them(fp32_models):
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0])
    assert vector.skipped == ("attn.mask", "position_ids")
    assert "position_ids" not in vector.names and "attn.mask" not in vector.names


def test_extract_records_the_base_fingerprint(fp32_models):
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0])
    assert vector.base_fingerprint == open_checkpoint(fp32_models.base).fingerprint()


def test_extract_accepts_state_dicts_and_hf_directories(tmp_path, fp32_models, hf_dir):
    from_files = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0])
    base_dir = hf_dir(tmp_path / "base", fp32_models.base_sd, num_shards=2)
    from_mixed = TaskVector.extract(base_dir, fp32_models.finetune_sds[0])
    assert from_mixed.base_fingerprint == from_files.base_fingerprint
    assert_vector_equals(from_mixed, {n: from_files.get_tensor(n) for n in from_files.names}, rtol=0, atol=0)


def test_extract_include_patterns_select_tensors_and_the_rest_are_skipped(fp32_models):
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0], include=["layers.*"])
    assert vector.names == ["layers.0.attn.bias", "layers.0.attn.weight", "layers.1.mlp.weight"]
    assert vector.skipped == ("attn.mask", "embed.weight", "norm.weight", "position_ids")


def test_extract_exclude_patterns_drop_tensors(fp32_models):
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0], exclude=["*.bias", "embed.*"])
    assert vector.names == ["layers.0.attn.weight", "layers.1.mlp.weight", "norm.weight"]


def test_extract_with_include_and_exclude_applies_both(fp32_models):
    vector = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0], include=["layers.*"], exclude=["*.bias"])
    assert vector.names == ["layers.0.attn.weight", "layers.1.mlp.weight"]


def test_extract_matching_nothing_is_refused(fp32_models):
    with pytest.raises(TaskVecError, match="no floating-point tensors .* match the include/exclude patterns"):
        TaskVector.extract(fp32_models.base, fp32_models.finetunes[0], include=["nothing.*"])


def test_extract_of_bf16_checkpoints_is_float32_and_exact(bf16_models):
    vector = TaskVector.extract(bf16_models.base, bf16_models.finetunes[0])
    assert all(vector.spec(n).dtype == torch.float32 for n in vector.names)
    assert_vector_equals(vector, {n: delta(bf16_models, 0, n) for n in FLOAT_NAMES}, rtol=0, atol=0)


def test_extract_base_and_finetune_with_different_tensor_names_is_refused_naming_the_tensor(tmp_path, fp32_models):
    ft = dict(fp32_models.finetune_sds[0])
    ft["extra.head"] = torch.zeros(3)
    save_file(ft, str(tmp_path / "ft_extra.safetensors"))
    with pytest.raises(TaskVecError, match="tensor 'extra.head' is in the fine-tune .* but not in the base"):
        TaskVector.extract(fp32_models.base, tmp_path / "ft_extra.safetensors")
    del ft["extra.head"], ft["norm.weight"]
    save_file(ft, str(tmp_path / "ft_missing.safetensors"))
    with pytest.raises(TaskVecError, match="tensor 'norm.weight' is in the base .* but not in the fine-tune"):
        TaskVector.extract(fp32_models.base, tmp_path / "ft_missing.safetensors")


def test_extract_base_and_finetune_with_different_shapes_is_refused_naming_the_tensor(tmp_path, fp32_models):
    ft = dict(fp32_models.finetune_sds[0])
    ft["norm.weight"] = torch.zeros(9)
    save_file(ft, str(tmp_path / "ft.safetensors"))
    with pytest.raises(TaskVecError, match=r"tensor 'norm.weight' has shape \[8\] in the base but \[9\] in the fine-tune"):
        TaskVector.extract(fp32_models.base, tmp_path / "ft.safetensors")


# -- algebra ---------------------------------------------------------------------------


def test_addition_adds_elementwise_and_joins_task_names(fp32_models, vectors):
    a, b = vectors[0], vectors[1]
    total = a + b
    assert total.task == "task0 + task1"
    assert_vector_equals(total, {n: delta(fp32_models, 0, n) + delta(fp32_models, 1, n) for n in FLOAT_NAMES})


def test_subtraction_and_negation(fp32_models, vectors):
    a, b = vectors[0], vectors[1]
    assert_vector_equals(a - b, {n: delta(fp32_models, 0, n) - delta(fp32_models, 1, n) for n in FLOAT_NAMES})
    assert_vector_equals(-a, {n: -delta(fp32_models, 0, n) for n in FLOAT_NAMES}, rtol=0, atol=0)


def test_scalar_multiplication_and_division(fp32_models, vectors):
    a = vectors[0]
    expected = {n: 2.5 * delta(fp32_models, 0, n) for n in FLOAT_NAMES}
    assert_vector_equals(a * 2.5, expected)
    assert_vector_equals(2.5 * a, expected)
    assert_vector_equals(a / 4, {n: delta(fp32_models, 0, n) / 4 for n in FLOAT_NAMES})


def test_algebra_is_lazy_and_leaves_operands_unchanged(fp32_models, vectors):
    a = vectors[0]
    _ = a * 3 + vectors[1]
    assert_vector_equals(a, {n: delta(fp32_models, 0, n) for n in FLOAT_NAMES}, rtol=0, atol=0)


def test_static_sum_and_builtin_sum_agree_with_elementwise_sum(fp32_models, vectors):
    expected = {n: sum(delta(fp32_models, i, n) for i in range(3)) for n in FLOAT_NAMES}
    assert_vector_equals(TaskVector.sum(vectors), expected)
    assert_vector_equals(sum(vectors), expected)


def test_sum_of_an_empty_list_is_refused():
    with pytest.raises(TaskVecError, match="cannot sum an empty list of task vectors"):
        TaskVector.sum([])


def test_division_by_zero_is_refused(vectors):
    with pytest.raises(TaskVecError, match="cannot divide a task vector by zero"):
        vectors[0] / 0


@pytest.mark.parametrize(
    ("factor", "message"),
    [("2", "'2' is not a number"), (None, "None is not a number"), (True, "True is not a number"),
     (float("nan"), "nan is not a finite number"), (float("inf"), "inf is not a finite number")],
)
def test_scaling_by_a_non_number_is_refused(vectors, factor, message):
    with pytest.raises(TaskVecError, match=f"^{message}$"):
        vectors[0] * factor


def test_adding_a_non_vector_is_a_type_error(vectors):
    with pytest.raises(TypeError, match="cannot combine a TaskVector with str"):
        vectors[0] + "x"


# -- reductions ------------------------------------------------------------------------


def flat(models, i):
    """The whole vector in float64, as the reductions compute it."""
    return torch.cat([(models.finetune_sds[i][n].double() - models.base_sd[n].double()).reshape(-1) for n in FLOAT_NAMES])


def test_norm_is_the_l2_norm_over_all_tensors(fp32_models, vectors):
    assert vectors[0].norm() == pytest.approx(float(flat(fp32_models, 0).norm()), rel=1e-12)


def test_dot_and_cosine(fp32_models, vectors):
    a, b = flat(fp32_models, 0), flat(fp32_models, 1)
    assert vectors[0].dot(vectors[1]) == pytest.approx(float(a @ b), rel=1e-12)
    assert vectors[0].cosine(vectors[1]) == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)
    assert vectors[0].cosine(vectors[0] * 3) == pytest.approx(1.0)
    assert vectors[0].cosine(-vectors[0]) == pytest.approx(-1.0)


def test_tensor_norms_are_per_tensor(fp32_models, vectors):
    norms = vectors[0].tensor_norms()
    assert sorted(norms) == FLOAT_NAMES
    for name in FLOAT_NAMES:
        exact = fp32_models.finetune_sds[0][name].double() - fp32_models.base_sd[name].double()
        assert norms[name] == pytest.approx(float(exact.norm()), rel=1e-12)
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(vectors[0].norm())


def test_cosine_with_a_zero_vector_is_refused(vectors):
    with pytest.raises(TaskVecError, match="cosine similarity of a zero task vector is undefined"):
        (vectors[0] - vectors[0]).cosine(vectors[1])


# -- different bases, names, shapes ----------------------------------------------------


@pytest.fixture
def other_base_vector(tmp_path, fp32_models):
    other = {n: (t + 1 if t.is_floating_point() else t) for n, t in fp32_models.base_sd.items()}
    save_file(other, str(tmp_path / "other_base.safetensors"))
    return TaskVector.extract(tmp_path / "other_base.safetensors", fp32_models.finetunes[0])


@pytest.mark.parametrize(
    "combine",
    [
        pytest.param(lambda a, b: a + b, id="add"),
        pytest.param(lambda a, b: a - b, id="sub"),
        pytest.param(lambda a, b: TaskVector.sum([a, b]), id="sum"),
        pytest.param(lambda a, b: a.dot(b), id="dot"),
        pytest.param(lambda a, b: a.cosine(b), id="cosine"),
    ],
)
def test_combining_vectors_of_different_bases_is_refused_naming_both_fingerprints(vectors, other_base_vector, combine):
    a, b = vectors[0], other_base_vector
    with pytest.raises(TaskVecError, match="different bases") as info:
        combine(a, b)
    assert a.base_fingerprint[:16] in str(info.value)
    assert b.base_fingerprint[:16] in str(info.value)


def test_combining_vectors_with_different_tensor_names_is_refused_naming_the_tensor(fp32_models):
    a = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0], task="a")
    b = TaskVector.extract(fp32_models.base, fp32_models.finetunes[1], exclude=["norm.weight"], task="b")
    with pytest.raises(TaskVecError, match="tensor 'norm.weight' is in task vector 'a' but not in task vector 'b'"):
        a + b


def test_combining_vectors_with_different_shapes_is_refused_naming_the_tensor(fp32_models):
    a = TaskVector.extract(fp32_models.base, fp32_models.finetunes[0])
    b = TaskVector.extract(fp32_models.base, fp32_models.finetunes[1])
    reshaped = {n: (t.reshape(-1) if n == "embed.weight" else t) for n, t in ((n, b.get_tensor(n)) for n in b.names)}
    stored = StateDictCheckpoint(reshaped, metadata=b.metadata())
    c = TaskVector.load(stored)
    with pytest.raises(TaskVecError, match=r"tensor 'embed.weight' has shape \[16, 8\] in .* but \[128\] in"):
        a + c


# -- apply_to --------------------------------------------------------------------------


def test_apply_to_returns_base_plus_scaled_vector_as_a_state_dict(fp32_models, vectors):
    merged = vectors[0].apply_to(fp32_models.base, 0.5)
    assert isinstance(merged, dict) and sorted(merged) == sorted(fp32_models.base_sd)
    for name, base in fp32_models.base_sd.items():
        if base.is_floating_point():
            torch.testing.assert_close(merged[name], base + 0.5 * delta(fp32_models, 0, name))
        else:
            assert torch.equal(merged[name], base)


def test_apply_to_with_scale_one_reproduces_the_finetune(fp32_models, vectors):
    merged = vectors[0].apply_to(fp32_models.base, 1.0)
    for name, ft in fp32_models.finetune_sds[0].items():
        torch.testing.assert_close(merged[name], ft, rtol=0, atol=1e-6)


def test_apply_to_output_writes_a_loadable_file_and_returns_a_merge_result(fp32_models, vectors, out_dir):
    output = out_dir / "applied.safetensors"
    result = vectors[0].apply_to_output(fp32_models.base, output, 1.0)
    assert isinstance(result, MergeResult)
    assert result.output == output and result.method == "task_arithmetic" and result.scale == 1.0
    written = load_file(str(output))
    assert result.fingerprint == open_checkpoint(output).fingerprint()
    for name, ft in fp32_models.finetune_sds[0].items():
        torch.testing.assert_close(written[name], ft, rtol=0, atol=1e-6)


def test_apply_to_of_a_combination_applies_the_combination(fp32_models, vectors):
    combo = 0.5 * vectors[0] - vectors[1] / 2
    merged = combo.apply_to(fp32_models.base, 2.0)
    for name in FLOAT_NAMES:
        expected = fp32_models.base_sd[name] + 2.0 * (0.5 * delta(fp32_models, 0, name) - 0.5 * delta(fp32_models, 1, name))
        torch.testing.assert_close(merged[name], expected)


# -- save / load -----------------------------------------------------------------------


def test_save_writes_a_safetensors_file_with_values_and_metadata(fp32_models, vectors, out_dir):
    path = out_dir / "vec.safetensors"
    fingerprint = vectors[0].save(path)
    tensors = load_file(str(path))
    assert sorted(tensors) == FLOAT_NAMES
    for name in FLOAT_NAMES:
        assert torch.equal(tensors[name], delta(fp32_models, 0, name))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["taskvec.base_fingerprint"] == vectors[0].base_fingerprint
    assert meta["taskvec.task"] == "task0"
    assert meta["taskvec.format_version"] == "1"
    assert json.loads(meta["taskvec.skipped"]) == ["attn.mask", "position_ids"]
    assert fingerprint == open_checkpoint(path).fingerprint()


def test_load_restores_values_task_base_fingerprint_and_skipped(vectors, out_dir):
    vectors[0].save(out_dir / "vec.safetensors")
    loaded = TaskVector.load(out_dir / "vec.safetensors")
    assert loaded.task == "task0"
    assert loaded.base_fingerprint == vectors[0].base_fingerprint
    assert loaded.skipped == vectors[0].skipped
    assert_vector_equals(loaded, {n: vectors[0].get_tensor(n) for n in vectors[0].names}, rtol=0, atol=0)


def test_sharded_save_loads_back_from_its_directory(vectors, out_dir):
    combo = vectors[0] + vectors[1]
    fingerprint = combo.save(out_dir / "vec", max_shard_size="200B")
    assert (out_dir / "vec" / "model.safetensors.index.json").is_file()
    loaded = TaskVector.load(out_dir / "vec")
    assert loaded.base_fingerprint == combo.base_fingerprint and loaded.task == "task0 + task1"
    assert_vector_equals(loaded, {n: combo.get_tensor(n) for n in combo.names}, rtol=0, atol=0)
    assert fingerprint == open_checkpoint(out_dir / "vec").fingerprint()


def test_save_in_a_requested_dtype(vectors, out_dir):
    vectors[0].save(out_dir / "vec.safetensors", dtype="bf16")
    loaded = TaskVector.load(out_dir / "vec.safetensors")
    assert all(loaded.spec(n).dtype == torch.bfloat16 for n in loaded.names)
    for name in loaded.names:
        torch.testing.assert_close(loaded.get_tensor(name), vectors[0].get_tensor(name).bfloat16().float(), rtol=0, atol=0)


def test_loaded_vectors_combine_with_extracted_ones_of_the_same_base(fp32_models, vectors, out_dir):
    vectors[1].save(out_dir / "vec1.safetensors")
    total = vectors[0] + TaskVector.load(out_dir / "vec1.safetensors")
    assert_vector_equals(total, {n: delta(fp32_models, 0, n) + delta(fp32_models, 1, n) for n in FLOAT_NAMES})


def test_loading_a_checkpoint_that_is_not_a_task_vector_is_refused(fp32_models):
    with pytest.raises(TaskVecError, match="not a task vector"):
        TaskVector.load(fp32_models.base)


def test_save_to_an_existing_output_is_refused_unless_overwrite(vectors, out_dir):
    path = out_dir / "vec.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(TaskVecError, match="output already exists"):
        vectors[0].save(path)
    assert path.read_bytes() == b"keep me"
    vectors[0].save(path, overwrite=True)
    assert sorted(load_file(str(path))) == FLOAT_NAMES


def test_save_of_a_vector_with_nan_is_refused_naming_tensor_and_file_and_leaves_no_output(
    tmp_path, fp32_models, out_dir, assert_no_output
):
    ft = dict(fp32_models.finetune_sds[0])
    ft["norm.weight"] = ft["norm.weight"].clone()
    ft["norm.weight"][3] = float("nan")
    save_file(ft, str(tmp_path / "ft_nan.safetensors"))
    vector = TaskVector.extract(fp32_models.base, tmp_path / "ft_nan.safetensors")
    for output, shard in ((out_dir / "vec.safetensors", None), (out_dir / "vec", "100B")):
        with pytest.raises(TaskVecError, match=r"tensor 'norm.weight' of .*ft_nan.safetensors holds NaN or Inf"):
            vector.save(output, max_shard_size=shard)
        assert_no_output(output)
    vector.save(out_dir / "vec.safetensors", allow_nonfinite=True)
    assert torch.isnan(load_file(str(out_dir / "vec.safetensors"))["norm.weight"][3])


def test_extract_refuses_mismatched_inputs_naming_the_tensor_and_both_shapes_before_a_save_can_start(tmp_path, fp32_models):
    ft = dict(fp32_models.finetune_sds[0])
    ft["norm.weight"] = torch.zeros(9)
    save_file(ft, str(tmp_path / "ft.safetensors"))

    with pytest.raises(TaskVecError, match=r"^tensor 'norm.weight' has shape \[8\] in the base but \[9\] in the fine-tune$"):
        TaskVector.extract(fp32_models.base, tmp_path / "ft.safetensors")


def test_a_save_failing_after_it_wrote_tensors_leaves_no_output_and_no_partial_file(tmp_path, fp32_models, out_dir, assert_no_output):
    """The NaN is in the last tensor written, so the writer has streamed every other tensor
    into its temporary file when the check fails."""
    ft = dict(fp32_models.finetune_sds[0])
    last = sorted(name for name, t in ft.items() if t.is_floating_point())[-1]
    ft[last] = ft[last].clone()
    ft[last].view(-1)[-1] = float("inf")
    save_file(ft, str(tmp_path / "ft_inf.safetensors"))
    vector = TaskVector.extract(fp32_models.base, tmp_path / "ft_inf.safetensors")
    written = []

    with pytest.raises(TaskVecError, match=f"tensor '{last}' of .*ft_inf.safetensors holds NaN or Inf"):
        vector.save(out_dir / "vec.safetensors", progress=written.append)

    assert written == sorted(vector.names)[:-1]  # every tensor before the last was written
    assert_no_output(out_dir / "vec.safetensors")
