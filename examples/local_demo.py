"""Local-file workflow, no MLflow: base -> fine-tunes -> task vectors -> composites.

Trains a small base on scikit-learn's digits, fine-tunes it on four new label
spaces, extracts the task vectors, composes an addition (task arithmetic and
TIES) and a negation through YAML recipes, with the coefficients that
``make demo``'s search picked for seed 0 (rounded), and prints every model's test accuracy
per task.

    python examples/local_demo.py [--workdir demo/local]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "digits"))

from digits_tasks import HIDDEN, accuracy, build_model, load_weights, train  # noqa: E402

from mlflow_taskvec import TaskVector, open_checkpoint  # noqa: E402
from mlflow_taskvec.compose import compose_to  # noqa: E402
from mlflow_taskvec.recipe import load_recipe  # noqa: E402

FINETUNE_TASKS = ("parity", "large", "mod3", "loop")
EVAL_TASKS = ("digits",) + FINETUNE_TASKS


def save_model_dir(model, path: Path, hidden: int) -> None:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "DigitsNet", "hidden": hidden}) + "\n")


def load_model_dir(path: Path, hidden: int):
    ckpt = open_checkpoint(path)
    return load_weights({k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}, hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo/local"))
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--steps", type=int, default=300, help="pre-training steps")
    parser.add_argument("--finetune-steps", type=int, default=100)
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    print("training the base on 'digits' and fine-tuning it on", ", ".join(FINETUNE_TASKS))
    base = train(build_model(0, args.hidden), "digits", steps=args.steps)
    save_model_dir(base, work / "base", args.hidden)
    for task in FINETUNE_TASKS:
        ft = train(copy.deepcopy(base), task, steps=args.finetune_steps)
        save_model_dir(ft, work / "finetuned" / task, args.hidden)
        vector = TaskVector.extract(work / "base", work / "finetuned" / task, task=task)
        fp = vector.save(work / "vectors" / f"{task}.safetensors")
        print(f"  task vector {task:<7} {vector.num_parameters} parameters, fingerprint {fp[:16]}")

    recipes = {
        "addition (task arithmetic)": {"method": "task_arithmetic", "scale": 0.6, "weights": {t: 1.0 for t in FINETUNE_TASKS}},
        "addition (ties)": {
            "method": "ties",
            "scale": 1.5,
            "params": {"density": 0.9},
            "weights": {t: 1.0 for t in FINETUNE_TASKS},
        },
        "negation of parity": {"method": "task_arithmetic", "scale": 0.4, "weights": {"parity": -1.0}},
    }
    rows = {"base": {t: accuracy(base, t) for t in EVAL_TASKS}}
    for task in FINETUNE_TASKS:
        rows[f"fine-tuned on {task}"] = {t: accuracy(load_model_dir(work / "finetuned" / task, args.hidden), t) for t in EVAL_TASKS}
    for i, (label, spec) in enumerate(recipes.items()):
        recipe = {
            "base": "base",
            "method": spec["method"],
            "scale": spec["scale"],
            "params": spec.get("params", {}),
            "vectors": [{"vector": f"vectors/{t}.safetensors", "weight": w} for t, w in spec["weights"].items()],
            "output": f"composites/{i}",
        }
        path = work / f"recipe-{i}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        result = compose_to(load_recipe(path))
        print(f"  composite {label:<28} {result.method}, scale {result.scale}, fingerprint {result.fingerprint[:16]}")
        model = load_model_dir(work / "composites" / str(i), args.hidden)
        rows[label] = {t: accuracy(model, t) for t in EVAL_TASKS}

    table = pd.DataFrame(rows).T.rename_axis("model")
    print("\ntest accuracy per task (rows: models, columns: tasks)")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nfiles under {work}  ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
