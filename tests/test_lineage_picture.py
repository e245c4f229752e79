"""The lineage picture (``lineage.png`` on every composite's run, ``lineage --format png``) and the
links from a version's description table to the registry UI's version pages."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import mlflow
import pytest
from click.testing import CliRunner
from mlflow_helpers import BASE_NAME, COMPOSITE_NAME, run_artifact, vector_name

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.mlflow.lineage import lineage
from mlflow_taskvec.mlflow.lineage import Node
from mlflow_taskvec.mlflow.lineage_plot import DPI, _boxes, _edge_label
from mlflow_taskvec.mlflow.registry import version_page
from team_server import skip_or_fail


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_registered_composite_logs_its_lineage_picture_to_its_run(registry, client):
    logged = run_artifact(client, registry.composite.run_id, "lineage.png")
    names = [a.path for a in client.list_artifacts(registry.composite.run_id)]

    image = matplotlib.image.imread(logged)

    assert "lineage.png" in names
    assert logged.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # three columns (fine-tunes and base, task vectors, the composite), three rows (base and two fine-tunes)
    assert image.shape[:2] == (round((0.95 * 3 + 0.8) * DPI), round((3.4 * 3 + 0.4) * DPI))


def test_lineage_png_writes_the_same_picture_as_the_one_logged(registry, client, tmp_path):
    out = tmp_path / "pictures" / "composite.png"
    out.parent.mkdir()  # a side output's folder must exist: none is created (tests/test_bad_input.py)

    result = invoke("lineage", f"models:/{COMPOSITE_NAME}@champion", "--format", "png", "-o", out)

    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"lineage picture: {out} (")
    assert out.read_bytes() == run_artifact(client, registry.composite.run_id, "lineage.png").read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["composite.png"]  # no temporary file left


def test_the_picture_draws_a_shared_base_once_left_of_everything_it_feeds(registry):
    boxes = {b.node.uri: b for b in _boxes(lineage(f"models:/{COMPOSITE_NAME}/1"))}
    ft = registry.finetunes

    assert len(boxes) == 6  # composite, base, two task vectors, two fine-tunes
    assert boxes[f"models:/{COMPOSITE_NAME}/1"].column == 0
    assert boxes[f"models:/{vector_name('rotate')}/1"].column == boxes[f"models:/{vector_name('flip')}/1"].column == 1
    # the base feeds the composite directly and through each vector: it stands in the leftmost column
    assert boxes[f"models:/{BASE_NAME}/1"].column == boxes[f"models:/{ft['rotate'].model_id}"].column == 2
    edges = sorted((child.node.uri, edge.role, edge.weight) for b in boxes.values() for child, edge in b.children)
    assert (f"models:/{vector_name('flip')}/1", "input", -0.5) in edges
    assert sum(1 for uri, role, _ in edges if uri == f"models:/{BASE_NAME}/1") == 3


def test_lineage_png_without_an_output_file_is_a_usage_error(registry):
    result = invoke("lineage", f"models:/{COMPOSITE_NAME}/1", "--format", "png")

    assert result.exit_code == 2
    assert "--format png writes a picture: give --output FILE.png" in result.stderr


def test_lineage_text_formats_can_be_written_to_a_file(registry, tmp_path):
    out = tmp_path / "lineage.dot"

    result = invoke("lineage", f"models:/{COMPOSITE_NAME}/1", "--format", "dot", "-o", out)

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert out.read_text("utf-8").startswith("digraph lineage {")


# -- links to the registry UI -----------------------------------------------------------------


def test_each_model_in_the_description_table_links_to_its_version_page(registry, client):
    text = client.get_model_version(COMPOSITE_NAME, "1").description
    links = re.findall(r"\[`([^`]+)`\]\(([^)]+)\)", text)

    assert links == [
        (BASE_NAME, f"#/models/{BASE_NAME}/versions/1"),
        (vector_name("rotate"), f"#/models/{vector_name('rotate')}/versions/1"),
        (vector_name("flip"), f"#/models/{vector_name('flip')}/versions/1"),
    ]
    # and a task vector's description links its registered base (its fine-tune is a logged model: no version page)
    vector_text = client.get_model_version(vector_name("rotate"), "1").description
    assert re.findall(r"\]\(([^)]+)\)", vector_text) == [f"#/models/{BASE_NAME}/versions/1"]


def test_a_version_page_link_encodes_the_name_as_the_ui_does():
    # encodeURIComponent: spaces, slashes and '@' escaped; !*'() and -_.~ kept
    assert version_page("team/a b@x", "3") == "#/models/team%2Fa%20b%40x/versions/3"
    assert version_page("it's-(v1)_~.!*", "12") == "#/models/it's-(v1)_~.!*/versions/12"


def test_the_link_is_the_route_of_the_installed_registry_ui():
    bundles = sorted((Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js").glob("main*.js"))
    if not bundles:
        skip_or_fail("this MLflow install has no UI bundle")
    ui = bundles[0].read_text("utf-8", errors="replace")

    # the UI routes with a hash router, and a model version's page is /models/:modelName/versions/:version
    assert "createHashRouter" in ui
    assert '"/models/:modelName/versions/:version"' in ui
    assert "modelName:encodeURIComponent(e),version:t" in ui


def test_an_arrow_names_the_role_and_the_weight_or_that_it_is_per_layer():
    assert _edge_label(Node(role="input", uri="a", kind="task_vector", weight=-0.5)) == "input -0.5"
    assert _edge_label(Node(role="input", uri="a", kind="task_vector", weight={"encoder.0.*": 0.2, "*": 0.3})) == "input per layer (2 globs)"
    assert _edge_label(Node(role="base", uri="b", kind="model")) == "base"
