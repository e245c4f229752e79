"""Governance: approval policies, ``approve``, ``lineage`` and ``verify``.

One small registry per module (conftest's ``registry`` fixture, made by
``build_registry``). Tests that approve, delete or tamper register versions of
their own (``register_vector_copy``) so that the shared registry stays as built. Tampering edits the real files of the sqlite
store's artifact folder. Bad input of these commands is catalogued in
test_bad_input.py.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timedelta, timezone

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow_helpers import (
    BASE_NAME,
    COMPOSITE_NAME,
    all_versions,
    composite_recipe,
    flip_last_byte,
    register_vector_copy,
    replace_weights_with_matching_records,
    run_artifact,
    stored_weights,
    vector_name,
)

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.recipe import load_recipe, parse_recipe
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.registry import register_composite, register_task_vector

# about 15 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(15)


def invoke(*args, **env):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env or None)


def ok(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def refused(result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def one_input_recipe(uri: str, **extra) -> dict:
    return {"base": f"models:/{BASE_NAME}/1", "scale": 0.5, "vectors": [{"vector": uri, "weight": 1.0}], **extra}


def write_recipe(path, data: dict):
    path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
    return path


def composite_of_copy(registry, name: str, task: str = "rotate"):
    """A vector copy ``{name}-vector`` and a composite ``name`` made of it alone."""
    vector = register_vector_copy(registry, task, f"{name}-vector")
    return vector, register_composite(parse_recipe(one_input_recipe(vector.version_uri)), name)


# -- policy ----------------------------------------------------------------------------------


def test_a_recipe_without_a_policy_keeps_the_digest_it_had_before_policies_existed():
    recipe = parse_recipe(
        {
            "base": "models:/digits-base/1",
            "method": "ties",
            "scale": 0.6,
            "params": {"density": 0.5},
            "vectors": [{"vector": "models:/digits-rotate-vector/1", "weight": 1.0}, {"finetuned": "models:/ft/2", "weight": -0.5, "task": "flip"}],
        }
    )

    assert "policy" not in json.loads(recipe.canonical_json())
    # computed with the code before this change
    assert recipe.sha256() == "ee57fd687fcfaa56d3ea78ad5978acb9aebbe01a3bf6d3a93bb606644881756b"


def test_a_policy_is_part_of_the_recipe_digest_when_set():
    plain = parse_recipe(composite_recipe())
    with_policy = parse_recipe({**composite_recipe(), "policy": {"require_alias": "approved"}})

    assert json.loads(with_policy.canonical_json())["policy"] == {"require_alias": "approved"}
    assert with_policy.sha256() != plain.sha256()


def test_a_policy_refuses_an_input_whose_version_lacks_the_alias_and_registers_nothing(registry, client, tmp_path):
    vector = register_vector_copy(registry, "rotate", "unapproved-vector")
    recipe = write_recipe(tmp_path / "recipe.yaml", one_input_recipe(vector.version_uri, policy={"require_alias": "approved"}))
    runs_before, versions_before = len(mlflow.search_runs(search_all_experiments=True)), all_versions(client)

    message = refused(invoke("compose", recipe, "--register", "policy-refused", "-o", tmp_path / "out"))

    assert message == (
        "Error: vectors[0] (models:/unapproved-vector/1): version 1 of 'unapproved-vector' does not carry the alias 'approved' "
        "the policy requires (approve it with: mlflow-taskvec approve models:/unapproved-vector/1 --alias approved)"
    )
    assert all_versions(client) == versions_before
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    assert not (tmp_path / "out").exists()


def test_a_policy_accepts_inputs_by_version_or_alias_once_their_versions_are_approved(registry, client, tmp_path):
    rotate = register_vector_copy(registry, "rotate", "policy-rotate")
    flip = register_vector_copy(registry, "flip", "policy-flip")
    ok(invoke("approve", rotate.version_uri, "--alias", "approved"))
    ok(invoke("approve", flip.version_uri, "--alias", "approved"))
    data = {
        "base": f"models:/{BASE_NAME}/1",
        "scale": 0.5,
        "vectors": [{"vector": "models:/policy-rotate@approved"}, {"vector": "models:/policy-flip/1", "weight": -1.0}],
        "policy": {"require_alias": "approved"},
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", data)

    lines = ok(invoke("compose", recipe, "--register", "policy-composite"))

    assert lines[-1].startswith("registered: models:/policy-composite/1")
    version = client.get_model_version("policy-composite", "1")
    logged = load_recipe(run_artifact(client, version.run_id, "recipe.yaml"))
    assert logged.policy.require_alias == "approved"
    assert logged.sha256() == version.tags["taskvec.recipe_sha256"]
    assert [row["uri"] for row in json.loads(version.tags["taskvec.inputs"])] == ["models:/policy-rotate/1", "models:/policy-flip/1"]


def test_require_alias_checks_the_version_a_reference_names_not_an_older_approved_one(registry, tmp_path):
    first = register_vector_copy(registry, "flip", "moving-vector")
    second = register_vector_copy(registry, "flip", "moving-vector")
    ok(invoke("approve", first.version_uri, "--alias", "approved"))
    recipe = write_recipe(tmp_path / "recipe.yaml", one_input_recipe(second.version_uri))

    message = refused(invoke("compose", recipe, "-o", tmp_path / "out.safetensors", "--require-alias", "approved"))
    ok(invoke("approve", second.version_uri, "--alias", "approved"))
    lines = ok(invoke("compose", recipe, "-o", tmp_path / "out.safetensors", "--require-alias", "approved"))

    assert "vectors[0] (models:/moving-vector/2): version 2 of 'moving-vector' does not carry the alias 'approved'" in message
    assert lines[0] == f"composite: {tmp_path / 'out.safetensors'}"


def test_a_registered_vector_from_another_base_is_refused_before_a_run_starts(registry, client, tmp_path):
    from mlflow_helpers import finetune_of, log_checkpoint, tiny_net

    from mlflow_taskvec.engine.taskvector import TaskVector
    from mlflow_taskvec.mlflow.downloads import resolve
    from mlflow_taskvec.mlflow.registry import register_task_vector

    other = tiny_net(7)
    with mlflow.start_run():
        other_info = log_checkpoint(other, "other-base")
        ft_info = log_checkpoint(finetune_of(other, seed=3), "other-ft")
    other_ref, ft_ref = resolve(other_info.model_uri), resolve(ft_info.model_uri)
    foreign = register_task_vector(TaskVector.extract(other_ref.path, ft_ref.path), "foreign-vector", other_ref, ft_ref)
    recipe = write_recipe(tmp_path / "recipe.yaml", {**composite_recipe(), "vectors": [*composite_recipe()["vectors"], {"vector": foreign.version_uri}]})
    base_fp = client.get_model_version(vector_name("rotate"), "1").tags["taskvec.base_fingerprint"]
    runs_before, versions_before = len(mlflow.search_runs(search_all_experiments=True)), all_versions(client)

    message = refused(invoke("compose", recipe, "--register", "foreign-composite"))

    assert message == (
        f"Error: vectors[2] was extracted from a different base: models:/foreign-vector/1 records base fingerprint "
        f"{other_ref.fingerprint[:16]}, the recipe's base models:/{BASE_NAME}@current has {base_fp[:16]}"
    )
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    assert all_versions(client) == versions_before


# -- approve ---------------------------------------------------------------------------------


def test_approve_points_the_alias_and_records_who_when_and_why(registry, client):
    vector = register_vector_copy(registry, "rotate", "approve-me")
    before = datetime.now(timezone.utc).replace(microsecond=0)

    lines = ok(invoke("approve", "models:/approve-me/1", "--alias", "approved", "--note", "eval 0.93 on rotate", MLFLOW_TRACKING_USERNAME="alice"))

    version = client.get_model_version("approve-me", vector.version)
    at = version.tags["taskvec.approval.approved.at"]
    assert version.aliases == ["approved"]
    assert version.tags["taskvec.approval.approved.by"] == version.tags["taskvec.approved_by"] == "alice"
    assert version.tags["taskvec.approval.approved.note"] == "eval 0.93 on rotate"
    assert version.tags["taskvec.approved_at"] == at and at.endswith("Z")
    assert before <= datetime.fromisoformat(at.replace("Z", "+00:00")) <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert lines == [f"approved: models:/approve-me/1 as 'approved' by alice at {at} (eval 0.93 on rotate)"]
    tree = ok(invoke("lineage", "models:/approve-me@approved"))
    assert tree[0].endswith(f"  @approved  approved by alice at {at}")


def test_approve_without_an_mlflow_user_records_the_os_user(registry, client, monkeypatch):
    register_vector_copy(registry, "flip", "approve-os-user")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)

    ok(invoke("approve", "models:/approve-os-user/1", "--alias", "reviewed"))

    assert client.get_model_version("approve-os-user", "1").tags["taskvec.approval.reviewed.by"] == getpass.getuser()


def test_approving_by_alias_and_then_another_version_moves_the_alias_and_keeps_each_record(registry, client):
    register_vector_copy(registry, "rotate", "approve-twice", alias="candidate")
    register_vector_copy(registry, "rotate", "approve-twice")

    ok(invoke("approve", "models:/approve-twice@candidate", "--alias", "approved", "--note", "first", MLFLOW_TRACKING_USERNAME="alice"))
    ok(invoke("approve", "models:/approve-twice/2", "--alias", "approved", MLFLOW_TRACKING_USERNAME="bob"))
    ok(invoke("approve", "models:/approve-twice/1", "--alias", "rollback", MLFLOW_TRACKING_USERNAME="carol"))

    v1, v2 = client.get_model_version("approve-twice", "1"), client.get_model_version("approve-twice", "2")
    assert sorted(v1.aliases) == ["candidate", "rollback"] and v2.aliases == ["approved"]
    assert (v1.tags["taskvec.approval.approved.by"], v1.tags["taskvec.approval.approved.note"]) == ("alice", "first")
    assert v1.tags["taskvec.approval.rollback.by"] == v1.tags["taskvec.approved_by"] == "carol"
    assert v2.tags["taskvec.approval.approved.by"] == "bob"
    assert "taskvec.approval.approved.note" not in v2.tags
    at = v1.tags["taskvec.approval.approved.at"]
    line = ok(invoke("lineage", "models:/approve-twice/1"))[0]
    assert f"  was approved by alice at {at} (@approved has moved on)" in line
    assert f"  rollback by carol at {v1.tags['taskvec.approval.rollback.at']}" in line
    assert "  approved by" not in line.replace("was approved by", "")  # not shown as approved now
    tree = json.loads("\n".join(ok(invoke("lineage", "models:/approve-twice/1", "--format", "json"))))
    assert set(tree["approvals"]) == {"rollback"} and set(tree["past_approvals"]) == {"approved"}


# -- lineage ---------------------------------------------------------------------------------


def _fp(tags: dict, key: str = "taskvec.fingerprint") -> str:
    return tags[key][:16]


def test_lineage_prints_the_composite_its_inputs_their_fine_tunes_and_base_as_a_tree(registry, client):
    comp = client.get_model_version(COMPOSITE_NAME, "1").tags
    rotate, flip = (client.get_model_version(vector_name(t), "1").tags for t in ("rotate", "flip"))
    ft = registry.finetunes
    base = f"base: models:/{BASE_NAME}/1  [model]  fp {_fp(comp, 'taskvec.base_fingerprint')}  @current"

    lines = ok(invoke("lineage", f"models:/{COMPOSITE_NAME}@champion"))

    assert lines == [
        f"models:/{COMPOSITE_NAME}/1  [composite]  method task_arithmetic scale 0.7  fp {_fp(comp)}  run {registry.composite.run_id}  @champion",
        f"├── {base}",
        f"├── input: models:/{vector_name('rotate')}/1  [task_vector]  task rotate  weight 1  fp {_fp(rotate)}  @current",
        f"│   ├── {base}",
        f"│   └── fine-tune: models:/{ft['rotate'].model_id}  [logged model]  run {ft['rotate'].run_id}",
        f"└── input: models:/{vector_name('flip')}/1  [task_vector]  task flip  weight -0.5  fp {_fp(flip)}  @current",
        f"    ├── {base}",
        f"    └── fine-tune: models:/{ft['flip'].model_id}  [logged model]  run {ft['flip'].run_id}",
    ]


def test_lineage_of_a_composite_of_composites_nests_the_inner_composites_inputs(registry, client):
    recipe = {
        "base": f"models:/{BASE_NAME}/1",
        "scale": 0.5,
        "vectors": [{"finetuned": f"models:/{COMPOSITE_NAME}/1", "weight": 1.0}, {"vector": f"models:/{vector_name('flip')}/1", "weight": 0.5}],
    }
    register_composite(parse_recipe(recipe), "nested-composite")

    result = invoke("lineage", "models:/nested-composite/1", "--format", "json")

    ok(result)
    tree = json.loads(result.stdout)

    inner, flip = tree["children"][1:]
    assert (tree["kind"], tree["uri"]) == ("composite", "models:/nested-composite/1")
    assert tree["children"][0]["role"] == "base"
    assert (inner["role"], inner["kind"], inner["uri"], inner["weight"]) == ("input", "composite", f"models:/{COMPOSITE_NAME}/1", 1.0)
    assert inner["fingerprint"] == client.get_model_version(COMPOSITE_NAME, "1").tags["taskvec.fingerprint"]
    assert [(c["role"], c["uri"]) for c in inner["children"]] == [
        ("base", f"models:/{BASE_NAME}/1"),
        ("input", f"models:/{vector_name('rotate')}/1"),
        ("input", f"models:/{vector_name('flip')}/1"),
    ]
    assert [c["role"] for c in inner["children"][1]["children"]] == ["base", "fine-tune"]
    assert (flip["uri"], flip["weight"], flip["task"]) == (f"models:/{vector_name('flip')}/1", 0.5, "flip")
    # a fine-tune input (the inner composite) is re-extracted when verifying
    assert ok(invoke("verify", "models:/nested-composite/1", "-q")) == [f"verified: models:/nested-composite/1 (composite, fingerprint {tree['fingerprint'][:16]})"]


def test_verify_recursive_checks_every_registered_part_and_finds_a_vector_tampered_deep_down(registry, client):
    vector = register_vector_copy(registry, "rotate", "deep-vector")
    inner = register_composite(parse_recipe(one_input_recipe(vector.version_uri)), "deep-inner")
    outer_recipe = {"base": f"models:/{BASE_NAME}/1", "scale": 0.5, "vectors": [{"finetuned": inner.version_uri}, {"vector": f"models:/{vector_name('flip')}/1"}]}
    outer = register_composite(parse_recipe(outer_recipe), "deep-outer")

    lines = ok(invoke("verify", outer.version_uri, "--recursive", "-q"))

    assert [line.split(" (")[0] for line in lines] == [
        "verified: models:/deep-outer/1",
        "verified: models:/deep-inner/1",
        "verified: models:/deep-vector/1",
        f"verified: models:/{vector_name('flip')}/1",
    ]
    # (the base is a checkpoint model and the fine-tunes logged models: checked by fingerprint in each)
    flip_last_byte(stored_weights(client, vector.model_id))

    assert ok(invoke("verify", outer.version_uri, "-q"))[0].startswith("verified: models:/deep-outer/1")  # its own check cannot see it
    message = refused(invoke("verify", outer.version_uri, "--recursive"))
    assert message.startswith("Error: input vectors[0] models:/deep-vector/1: downloaded weights have fingerprint ")


def test_lineage_dot_draws_each_model_once_with_edges_from_inputs_to_results(registry):
    result = invoke("lineage", f"models:/{COMPOSITE_NAME}/1", "--format", "dot")

    ok(result)
    text = result.stdout

    assert text.startswith("digraph lineage {") and text.rstrip().endswith("}")
    assert text.count(f"models:/{BASE_NAME}/1\n") == 1  # the shared base: one node
    assert text.count("->") == 7  # base->composite, 2 inputs->composite, base and fine-tune -> each vector
    assert '[label="input -0.5"]' in text and '[label="fine-tune"]' in text


def test_lineage_shows_a_deleted_input_as_missing_and_verify_names_it(registry, client):
    vector, composite = composite_of_copy(registry, "orphaned")
    client.delete_model_version("orphaned-vector", vector.version)

    lines = ok(invoke("lineage", composite.version_uri))
    message = refused(invoke("verify", composite.version_uri))

    assert lines[2].startswith("└── input: models:/orphaned-vector/1  [missing]  weight 1  fp ")
    assert lines[2].endswith("!! missing: Model Version (name=orphaned-vector, version=1) not found")
    assert message == "Error: input vectors[0] models:/orphaned-vector/1: Model Version (name=orphaned-vector, version=1) not found"


def test_lineage_stops_at_a_cycle_in_edited_tags(registry, client):
    _, composite = composite_of_copy(registry, "cyclic")
    inputs = json.loads(composite.tags["taskvec.inputs"]) + [{"uri": composite.version_uri, "weight": 1.0, "fingerprint": composite.tags["taskvec.fingerprint"]}]
    client.set_model_version_tag("cyclic", composite.version, "taskvec.inputs", json.dumps(inputs))

    lines = ok(invoke("lineage", composite.version_uri))

    assert lines[-1] == f"└── input: {composite.version_uri}  [cycle]  weight 1  fp {composite.tags['taskvec.fingerprint'][:16]}  !! cycle: already above in this lineage"


# -- verify ----------------------------------------------------------------------------------


def test_verify_recomposes_a_composite_and_prints_verified(registry, client):
    tags = client.get_model_version(COMPOSITE_NAME, "1").tags

    lines = ok(invoke("verify", f"models:/{COMPOSITE_NAME}@champion"))

    assert lines[0] == f"verified: models:/{COMPOSITE_NAME}/1 (composite, fingerprint {_fp(tags)})"
    assert lines[1:] == [
        f"  ok  recipe.yaml: sha256 {tags['taskvec.recipe_sha256'][:16]} as recorded",
        f"  ok  base models:/{BASE_NAME}/1: fingerprint {_fp(tags, 'taskvec.base_fingerprint')} as recorded",
        f"  ok  input vectors[0] models:/{vector_name('rotate')}/1 (weight 1): fingerprint {_fp(registry.vectors['rotate'].tags)} as recorded",
        f"  ok  input vectors[1] models:/{vector_name('flip')}/1 (weight -0.5): fingerprint {_fp(registry.vectors['flip'].tags)} as recorded",
        f"  ok  stored weights: fingerprint {_fp(tags)} as recorded",
        f"  ok  recomposed from the recipe: fingerprint {_fp(tags)} as recorded",
    ]


def test_verify_re_extracts_a_task_vector(registry):
    tags = registry.vectors["flip"].tags

    lines = ok(invoke("verify", f"models:/{vector_name('flip')}/1", "--quiet"))

    assert lines == [f"verified: models:/{vector_name('flip')}/1 (task_vector, fingerprint {_fp(tags)})"]


def test_verify_detects_a_modified_byte_in_an_input_vectors_stored_weights(registry, client):
    vector, composite = composite_of_copy(registry, "tampered-input")
    resolve_first = invoke("verify", composite.version_uri)  # fills the download cache: verify must not trust it
    flip_last_byte(stored_weights(client, vector.model_id))

    message = refused(invoke("verify", composite.version_uri))

    assert resolve_first.exit_code == 0, resolve_first.output
    assert message.startswith("Error: input vectors[0] models:/tampered-input-vector/1: downloaded weights have fingerprint ")
    assert message.endswith(f", the model records {vector.tags['taskvec.fingerprint'][:16]} (tampered or incomplete artifact)")


def test_verify_detects_an_input_version_deleted_and_replaced_by_other_weights(registry, client):
    vector, composite = composite_of_copy(registry, "replaced", task="rotate")
    client.delete_registered_model("replaced-vector")
    impostor = register_vector_copy(registry, "flip", "replaced-vector")  # version 1 again, other weights
    assert impostor.version_uri == vector.version_uri

    message = refused(invoke("verify", composite.version_uri))
    lines = ok(invoke("lineage", composite.version_uri))

    assert message == (
        f"Error: input vectors[0] models:/replaced-vector/1 has fingerprint {impostor.tags['taskvec.fingerprint'][:16]}, "
        f"the version records {vector.tags['taskvec.fingerprint'][:16]} (the version was replaced or its artifact modified)"
    )
    assert lines[2].endswith(
        f"!! fingerprint differs: recorded {vector.tags['taskvec.fingerprint'][:16]} by its parent, {impostor.tags['taskvec.fingerprint'][:16]} on this version now"
    )


def test_verify_detects_an_edited_recipe_artifact(registry, client):
    _, composite = composite_of_copy(registry, "edited-recipe")
    path = run_artifact(client, composite.run_id, "recipe.yaml")
    data = yaml.safe_load(path.read_text("utf-8"))
    data["scale"] = 0.9
    path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")

    message = refused(invoke("verify", composite.version_uri))

    assert message == (
        f"Error: recipe.yaml of run {composite.run_id} has sha256 {load_recipe(path).sha256()[:16]}, "
        f"the version records {composite.tags['taskvec.recipe_sha256'][:16]} (the recipe was edited)"
    )


def test_verify_detects_a_modified_byte_in_the_composites_own_weights(registry, client):
    _, composite = composite_of_copy(registry, "tampered-output")
    flip_last_byte(stored_weights(client, composite.model_id))

    message = refused(invoke("verify", composite.version_uri))

    assert message.startswith(f"Error: stored weights of {composite.version_uri}: downloaded weights have fingerprint ")
    assert message.endswith("(tampered or incomplete artifact)")


def test_verify_detects_weights_and_records_replaced_together_by_recomposing(registry, client):
    """Someone rewrote the composite's weights and its MLmodel fingerprint consistently: only recomposing shows it."""
    _, composite = composite_of_copy(registry, "rewritten")
    new_fp = replace_weights_with_matching_records(client, composite.model_id)
    client.set_model_version_tag("rewritten", composite.version, "taskvec.fingerprint", new_fp)

    message = refused(invoke("verify", composite.version_uri))

    assert message == (
        f"Error: the recomposed model has fingerprint {composite.tags['taskvec.fingerprint'][:16]}, "
        f"the version records {new_fp[:16]} (the recipe and inputs do not reproduce it)"
    )


def test_verify_detects_a_task_vectors_fine_tune_replaced_by_other_weights_with_matching_records(registry, client):
    from mlflow_helpers import finetune_of, log_checkpoint

    with mlflow.start_run(run_name="finetune-to-replace"):
        ft_info = log_checkpoint(finetune_of(registry.base_net, seed=42), "finetuned")
    base_ref, ft_ref = resolve(registry.base_uri), resolve(ft_info.model_uri)
    vector = register_task_vector(TaskVector.extract(base_ref.path, ft_ref.path, task="rotate"), "finetune-replaced-vector", base_ref, ft_ref)
    new_fp = replace_weights_with_matching_records(client, ft_info.model_id)

    message = refused(invoke("verify", vector.version_uri))

    assert message == (
        f"Error: fine-tune {vector.tags['taskvec.finetuned_uri']} has fingerprint {new_fp[:16]}, "
        f"the version records {ft_ref.fingerprint[:16]} (the fine-tune was replaced or its artifact modified)"
    )


def test_verify_detects_a_task_vector_that_its_base_and_fine_tune_do_not_reproduce(registry):
    """Registered with the rotate fine-tune's lineage but holding the flip vector: every input
    is as recorded, only re-extracting shows the mismatch."""
    base_ref = resolve(registry.base_uri)
    rotate_ft, flip_ft = (resolve(f"models:/{registry.finetunes[task].model_id}") for task in ("rotate", "flip"))
    flip_weights = TaskVector.extract(base_ref.path, flip_ft.path, task="rotate")
    vector = register_task_vector(flip_weights, "not-reproduced-vector", base_ref, rotate_ft)

    message = refused(invoke("verify", vector.version_uri))

    assert message == (
        f"Error: the re-extracted task vector has fingerprint {registry.vectors['rotate'].tags['taskvec.fingerprint'][:16]}, "
        f"the version records {vector.tags['taskvec.fingerprint'][:16]} (the base and fine-tune do not reproduce it)"
    )


@pytest.mark.parametrize("tag", ["taskvec.inputs", "taskvec.base_uri"])
def test_verify_refuses_a_composite_whose_tags_name_other_models_than_its_recipe(registry, client, tag):
    _, composite = composite_of_copy(registry, f"edited-{tag.rpartition('.')[2]}")
    other = f"models:/{vector_name('flip')}/1"
    edited = json.dumps([{**json.loads(composite.tags[tag])[0], "uri": other}]) if tag == "taskvec.inputs" else other
    client.set_model_version_tag(composite.name, composite.version, tag, edited)

    message = refused(invoke("verify", composite.version_uri))

    assert message == (
        f"Error: {composite.version_uri}: the taskvec.inputs / taskvec.base_uri tags name other models than its recipe.yaml (a tag was edited)"
    )


def test_verify_refuses_a_version_missing_any_tag_it_verifies_against_naming_the_tag(registry, client):
    vector, composite = composite_of_copy(registry, "untagged")
    required = [
        (composite, ["taskvec.fingerprint", "taskvec.base_uri", "taskvec.base_fingerprint", "taskvec.inputs", "taskvec.recipe_sha256"]),
        (vector, ["taskvec.fingerprint", "taskvec.base_uri", "taskvec.base_fingerprint", "taskvec.finetuned_uri"]),
    ]
    messages = {}
    for version, tags in required:
        for tag in tags:
            client.delete_model_version_tag(version.name, version.version, tag)
            messages[version.version_uri, tag] = refused(invoke("verify", version.version_uri))
            client.set_model_version_tag(version.name, version.version, tag, version.tags[tag])

    assert messages == {
        (version.version_uri, tag): f"Error: {version.version_uri}: the version has no {tag} tag, so there is nothing to verify against"
        for version, tags in required
        for tag in tags
    }
    assert ok(invoke("verify", composite.version_uri, "-q"))[0].startswith(f"verified: {composite.version_uri}")


def test_verify_refuses_a_composite_whose_run_lost_its_recipe_yaml(registry, client):
    _, composite = composite_of_copy(registry, "recipe-deleted")
    run_artifact(client, composite.run_id, "recipe.yaml").unlink()

    message = refused(invoke("verify", composite.version_uri))

    assert message == f"Error: {composite.version_uri}: run {composite.run_id} has no recipe.yaml artifact to recompose from"


@pytest.mark.parametrize(
    "destination",
    [
        pytest.param(["--register", "download-refused"], id="register"),
        pytest.param(["-o", "{tmp}/refused.safetensors"], id="local-output"),
    ],
)
def test_the_policy_is_checked_before_anything_is_downloaded(registry, tmp_path, destination):
    approved = register_vector_copy(registry, "rotate", f"download-approved-{destination[0].strip('-')}")
    unapproved = register_vector_copy(registry, "flip", f"download-unapproved-{destination[0].strip('-')}")
    ok(invoke("approve", approved.version_uri, "--alias", "approved"))
    data = {
        "base": f"models:/{BASE_NAME}/1",
        "scale": 0.5,
        "vectors": [{"vector": approved.version_uri}, {"vector": unapproved.version_uri, "weight": -0.5}],
    }
    with_policy = write_recipe(tmp_path / "with-policy.yaml", {**data, "policy": {"require_alias": "approved"}})
    without_policy = write_recipe(tmp_path / "without-policy.yaml", data)
    refused_cache, compose_cache = tmp_path / "cache-refused", tmp_path / "cache-composed"

    message = refused(invoke("compose", with_policy, *(a.format(tmp=tmp_path) for a in destination), MLFLOW_TASKVEC_CACHE=str(refused_cache)))
    ok(invoke("compose", without_policy, "-o", tmp_path / "composed.safetensors", MLFLOW_TASKVEC_CACHE=str(compose_cache)))

    assert message.startswith(f"Error: vectors[1] ({unapproved.version_uri}): version 1 of '{unapproved.name}' does not carry the alias 'approved'")
    assert not refused_cache.exists() or list(refused_cache.rglob("*")) == []
    # the same inputs, without the policy, are downloaded into that cache: the check above can fail
    assert len(list(compose_cache.glob("fp-*.json"))) == 3  # the base and both vectors


def test_require_alias_is_enforced_but_not_recorded_in_the_logged_recipe(registry, client, tmp_path):
    vector = register_vector_copy(registry, "rotate", "require-alias-unrecorded")
    ok(invoke("approve", vector.version_uri, "--alias", "approved"))
    data = one_input_recipe(vector.version_uri)
    recipe = write_recipe(tmp_path / "recipe.yaml", data)

    ok(invoke("compose", recipe, "--register", "require-alias-composite", "--require-alias", "approved"))

    version = client.get_model_version("require-alias-composite", "1")
    logged = load_recipe(run_artifact(client, version.run_id, "recipe.yaml"))
    assert logged.policy is None
    assert "policy" not in json.loads(logged.canonical_json())
    assert version.tags["taskvec.recipe_sha256"] == logged.sha256() == parse_recipe(data).sha256()
