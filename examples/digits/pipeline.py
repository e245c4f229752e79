"""The digits example's MLproject steps: pretrain, finetune, and the whole pipeline.

    python examples/digits/pipeline.py pretrain --name digits-base
    python examples/digits/pipeline.py finetune --task rotate --base models:/digits-base@current
    python examples/digits/pipeline.py main

Run them through ``mlflow run . -e <step> --env-manager local``: each step logs
to the run that ``mlflow run`` created.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import digits_tasks as D  # noqa: E402

import mlflow  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mlflow_taskvec.mlflow import flavor  # noqa: E402
from mlflow_taskvec.engine.taskvector import TaskVector  # noqa: E402
from mlflow_taskvec.mlflow.downloads import resolve  # noqa: E402
from mlflow_taskvec.mlflow.registry import register_task_vector  # noqa: E402

FACTORY = "digits_tasks:build_model"
CODE = [str(HERE / "digits_tasks.py")]
FINETUNE_TASKS = ("parity", "large", "mod3", "loop", "rotate", "flip", "flip_parity")
ADDITION_TASKS = ("parity", "large", "mod3", "loop")
NEGATION_TASK = "parity"
ANALOGY = ("rotate", "flip_parity", "flip", "rotate_parity")  # C + (B - A) -> target
REPORT_TASKS = ("digits", *FINETUNE_TASKS, ANALOGY[3])


def task_name(value: str) -> str:
    try:
        D.parse_task(value)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's message as it is
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _signature(model):
    x, _ = D.load_task("digits", "test")
    example = pd.DataFrame(x[:5].numpy(), columns=[f"pixel_{i}" for i in range(64)])
    output = model(x[:5], "digits").detach().numpy()
    return infer_signature(example, output, params={"task": "digits"}), example


def _log_checkpoint(model, name: str, registered_model_name: str | None = None):
    signature, example = _signature(model)
    return flavor.log_model(
        model,
        name=name,
        factory=FACTORY,
        factory_kwargs={"hidden": D.HIDDEN},
        code_paths=CODE,
        signature=signature,
        input_example=example,
        registered_model_name=registered_model_name,
    )


def pretrain(args) -> None:
    with mlflow.start_run() as run:
        mlflow.log_params({"task": "digits", "steps": args.steps, "seed": args.seed})
        model = D.train(D.build_model(args.seed), "digits", steps=args.steps, seed=args.seed)
        info = _log_checkpoint(model, "base", registered_model_name=args.name)
        metrics = {f"{t}.accuracy": D.accuracy(model, t) for t in REPORT_TASKS}
        mlflow.log_metrics(metrics, model_id=info.model_id)
        MlflowClient().set_registered_model_alias(args.name, "current", info.registered_model_version)
        print(f"base: models:/{args.name}/{info.registered_model_version} (run {run.info.run_id})")


def finetune(args) -> None:
    with mlflow.start_run() as run:
        mlflow.log_params({"task": args.task, "base": args.base, "steps": args.steps, "lr": args.lr})
        base = flavor.load_model(args.base)
        model = D.train(copy.deepcopy(base), args.task, steps=args.steps, lr=args.lr)
        info = _log_checkpoint(model, "finetuned")
        mlflow.log_metrics({f"{t}.accuracy": D.accuracy(model, t) for t in (args.task, "digits")}, model_id=info.model_id)
        base_ref, ft_ref = resolve(args.base), resolve(info.model_uri)
        vector = TaskVector.extract(base_ref.path, ft_ref.path, task=args.task)
        name = args.vector_name or f"digits-{args.task}-vector"
        reg = register_task_vector(vector, name, base_ref, ft_ref, run_id=run.info.run_id)
        print(f"task vector: {reg.version_uri} from {ft_ref.canonical} (run {run.info.run_id})")


def recipes(base: str, grid_step: float = 0.05, trials: int = 30) -> dict[str, dict]:
    """The paper's three results as search recipes: negation, addition (task
    arithmetic and TIES) and analogy; coefficients are picked on the validation
    split and the winner is evaluated on the test split."""

    def vec(task: str, weight: float = 1.0) -> dict:
        return {"vector": f"models:/digits-{task}-vector@current", "weight": weight}

    def evaluation(*tasks: str) -> dict:
        return {"evaluator": "digits_tasks:evaluate", "split": "test", "tasks": list(tasks), "control_tasks": ["digits"]}

    def grid(high: float) -> dict:
        return {"strategy": "grid", "scale": {"low": 0.0, "high": high, "step": grid_step}}

    c, b, a, target = ANALOGY
    return {
        "digits-negation": {
            "base": base,
            "vectors": [vec(NEGATION_TASK, -1.0)],
            "evaluation": evaluation(NEGATION_TASK),
            # The target: the control task stays within 2 points of the base (0.98 x a base near 0.99).
            "search": {**grid(1.0), "objective": "negation", "control_min_ratio": 0.98},
        },
        "digits-addition": {
            "base": base,
            "method": "task_arithmetic",
            "vectors": [vec(t) for t in ADDITION_TASKS],
            "evaluation": evaluation(*ADDITION_TASKS),
            "search": {**grid(1.0), "objective": "mean_normalized"},
        },
        "digits-addition-ties": {
            "base": base,
            "method": "ties",
            "params": {"density": 0.5},
            "vectors": [vec(t) for t in ADDITION_TASKS],
            "evaluation": evaluation(*ADDITION_TASKS),
            # TIES averages the agreeing entries where task arithmetic sums them, so its
            # scale runs higher; optuna searches it together with the density.
            "search": {
                "strategy": "optuna",
                "objective": "mean_normalized",
                "scale": {"low": 0.0, "high": 4.0},
                "params": {"density": {"low": 0.1, "high": 1.0}},
                "trials": trials,
            },
        },
        "digits-analogy": {
            "base": base,
            "vectors": [vec(c), vec(b), vec(a, -1.0)],
            "evaluation": evaluation(target),
            "search": {**grid(2.0), "objective": f"{target}.accuracy"},
        },
    }


def _child(parent_id: str, entry_point: str, parameters: dict) -> str:
    submitted = mlflow.run(str(HERE.parent.parent), entry_point=entry_point, parameters=parameters, env_manager="local",
                           experiment_id=mlflow.get_run(parent_id).info.experiment_id)
    MlflowClient().set_tag(submitted.run_id, "mlflow.parentRunId", parent_id)
    return submitted.run_id


def main(args) -> None:
    client = MlflowClient()
    with mlflow.start_run() as parent, tempfile.TemporaryDirectory(prefix="taskvec-recipes-") as tmp:
        pid = parent.info.run_id
        mlflow.log_params(
            {"seed": args.seed, "steps": args.steps, "finetune_steps": args.finetune_steps, "grid_step": args.grid_step, "trials": args.trials}
        )
        _child(pid, "pretrain", {"name": "digits-base", "steps": args.steps, "seed": args.seed})
        base = f"models:/digits-base/{client.get_model_version_by_alias('digits-base', 'current').version}"
        for task in FINETUNE_TASKS:
            _child(pid, "finetune", {"task": task, "base": base, "steps": args.finetune_steps})
            name = f"digits-{task}-vector"
            latest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            client.set_registered_model_alias(name, "current", str(latest))
        for name, recipe in recipes(base, args.grid_step, args.trials).items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False), "utf-8")
            mlflow.log_artifact(str(path), artifact_path="recipes")
            _child(pid, "search", {"recipe": str(path), "name": name})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("--name", default="digits-base")
    p.add_argument("--steps", type=lambda v: int(float(v)), default=300)
    p.add_argument("--seed", type=lambda v: int(float(v)), default=0)
    p = sub.add_parser("finetune")
    p.add_argument("--task", required=True, type=task_name)
    p.add_argument("--base", required=True)
    p.add_argument("--steps", type=lambda v: int(float(v)), default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vector-name", default="")
    p = sub.add_parser("main")
    p.add_argument("--seed", type=lambda v: int(float(v)), default=0, help="the base's initialisation and heads")
    p.add_argument("--steps", type=lambda v: int(float(v)), default=300, help="pre-training steps")
    p.add_argument("--finetune-steps", type=lambda v: int(float(v)), default=100)
    p.add_argument("--grid-step", type=float, default=0.05, help="the scale grid's step")
    p.add_argument("--trials", type=lambda v: int(float(v)), default=30, help="optuna trials (the TIES search)")
    args = parser.parse_args()
    {"pretrain": pretrain, "finetune": finetune, "main": main}[args.step](args)
