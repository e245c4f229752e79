"""Start-up: commands import only what they use.

Each check runs in a fresh interpreter and reads its ``sys.modules``: local work
never imports MLflow (nor optuna, pandas, matplotlib or transformers), and
``--version`` does not even import torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_startup import tiny_recipe  # noqa: E402  (the benchmark composes the same recipe)

HEAVY = ("mlflow", "optuna", "pandas", "matplotlib", "transformers")


def _loaded_after(code: str, cwd: Path) -> set[str]:
    """Top-level package names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_loads_neither_mlflow_nor_torch(tmp_path):
    loaded = _loaded_after("import mlflow_taskvec.cli", tmp_path)
    assert "mlflow_taskvec" in loaded
    assert not loaded & {*HEAVY, "torch", "pydantic"}


def test_version_does_not_import_torch(tmp_path):
    code = (
        "from mlflow_taskvec.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
    )
    loaded = _loaded_after(code, tmp_path)
    assert not loaded & {*HEAVY, "torch"}


def test_help_of_the_cli_and_of_every_command_imports_neither_mlflow_nor_torch(tmp_path):
    """docs/cli.md: ``--help`` loads neither torch nor MLflow; each command's help is checked in
    the interpreter that showed every help before it, so what any one of them imports is seen."""
    code = (
        "import sys\n"
        "from mlflow_taskvec.cli import main\n"
        "names = sorted(main.commands)\n"
        "for args in [['--help']] + [[name, '--help'] for name in names]:\n"
        "    try:\n        main(args)\n    except SystemExit as exc:\n        assert exc.code == 0, (args, exc.code)\n"
        "    loaded = {m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'pydantic'}\n"
        "    assert not loaded, f'{args} imported {sorted(loaded)}'\n"
        "print(' '.join(names), file=sys.stderr)\n"
    )
    script = code + "\nimport json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    commands = out.stderr.split()
    assert {"compose", "compress", "extract", "inspect", "search", "verify", "leaderboard"} <= set(commands) and len(commands) >= 14
    assert not set(json.loads(out.stdout.strip().splitlines()[-1])) & {*HEAVY, "torch", "pydantic"}


COMPOSE = "main(['compose', 'recipe.yaml', '-o', 'out.safetensors', '-q'], standalone_mode=False)\n"


def _printed(code: str, cwd: Path):
    """The JSON that ``code``, run in a fresh interpreter, prints last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_compose_does_not_import_mlflow(tmp_path):
    tiny_recipe(tmp_path)
    code = "from mlflow_taskvec.cli import main\n" + COMPOSE
    loaded = _loaded_after(code, tmp_path)
    assert (tmp_path / "out.safetensors").is_file()  # it really composed
    assert "torch" in loaded
    assert not loaded & set(HEAVY)


def test_local_inspect_and_extract_do_not_import_mlflow(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 4, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": base["w"] * 2}, str(tmp_path / "ft.safetensors"))
    code = (
        "from mlflow_taskvec.cli import main\n"
        "main(['extract', '--base', 'base.safetensors', '--finetuned', 'ft.safetensors', '-o', 'tv.safetensors', '-q'], standalone_mode=False)\n"
        "main(['inspect', 'tv.safetensors'], standalone_mode=False)\n"
        "main(['methods'], standalone_mode=False)\n"
    )
    loaded = _loaded_after(code, tmp_path)
    assert (tmp_path / "tv.safetensors").is_file()
    assert not loaded & set(HEAVY)


def test_local_compress_and_its_help_do_not_import_mlflow(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(8, 6, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": base["w"] + 0.5 * torch.randn(8, 6, generator=g)}, str(tmp_path / "ft.safetensors"))
    code = (
        "from mlflow_taskvec.cli import main\n"
        "try:\n    main(['compress', '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
        "import sys\nassert 'torch' not in sys.modules, 'compress --help imported torch'\n"
        "main(['extract', '--base', 'base.safetensors', '--finetuned', 'ft.safetensors', '-o', 'tv.safetensors', '-q'], standalone_mode=False)\n"
        "for fmt, setting in (('sparse', '--density'), ('lowrank', '--rank'), ('bitdelta', None)):\n"
        "    args = ['compress', 'tv.safetensors', '--format', fmt, '-o', fmt + '.safetensors', '-q'] + ([setting, '2' if setting == '--rank' else '0.5'] if setting else [])\n"
        "    main(args, standalone_mode=False)\n"
    )
    loaded = _loaded_after(code, tmp_path)
    assert all((tmp_path / f"{fmt}.safetensors").is_file() for fmt in ("sparse", "lowrank", "bitdelta"))  # it really compressed
    assert not loaded & set(HEAVY)


def test_a_command_freezes_what_importing_torch_made_and_runs_no_full_collection_after(tmp_path):
    """The command imports torch first and freezes its objects (``gc.freeze``): no full collection
    of the start-up traverses them (one did, 0.08 s of CPU); and libc is opened by its soname, no
    ``ctypes.util.find_library`` (an ``ldconfig`` subprocess) at import."""
    tiny_recipe(tmp_path)
    code = (
        "import ctypes.util, gc, json\n"
        "full_after_freeze, looked_up, real = [], [], ctypes.util.find_library\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and info['generation'] == 2 and gc.get_freeze_count() and full_after_freeze.append(1))\n"
        "ctypes.util.find_library = lambda name: looked_up.append(name) or real(name)\n"
        "from mlflow_taskvec.cli import main\n" + COMPOSE +
        "import torch\n"
        "print(json.dumps([gc.get_freeze_count(), len(full_after_freeze), looked_up]))\n"
    )
    frozen, full_collections, looked_up = _printed(code, tmp_path)
    assert (tmp_path / "out.safetensors").is_file()
    assert frozen > 10_000  # torch's import leaves about 170,000 tracked objects
    assert full_collections == 0
    assert looked_up == []


def test_a_command_in_a_process_that_has_torch_leaves_its_collector_alone(tmp_path):
    """Where torch is imported already (the Python API, tests calling ``main``), nothing is frozen."""
    tiny_recipe(tmp_path)
    code = "import gc, json, torch\nfrom mlflow_taskvec.cli import main\n" + COMPOSE + "print(json.dumps(gc.get_freeze_count()))\n"
    assert _printed(code, tmp_path) == 0
    assert (tmp_path / "out.safetensors").is_file()
