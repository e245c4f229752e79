"""The text example: MiniLM fine-tuned on template-generated tasks, fully and with LoRA, edited by task arithmetic.

    python examples/text/pipeline.py                      # small: seconds per fine-tune (what the tests run)
    python examples/text/pipeline.py --full               # the table of docs/lora-hf.md
    python examples/text/pipeline.py --tasks sentiment,question --steps 20 --lora-rank 4

Against the tracking store of ``--tracking-uri`` (default: ``MLFLOW_TRACKING_URI``), it

1. logs the real all-MiniLM-L6-v2 twice: with ``mlflow.sentence_transformers`` (registered
   ``<prefix>-minilm-st``) and with ``mlflow.transformers`` (``<prefix>-minilm-hf``);
2. fine-tunes it on each task, fully (a SentenceTransformer, logged with
   ``mlflow.sentence_transformers``) and with a PEFT LoRA on query/value (a PeftModel, logged with
   ``mlflow.transformers``); the tasks' heads are frozen (``text_tasks.head``), so only the encoder learns;
3. registers each fine-tune's task vector with ``mlflow-taskvec extract --register`` (the LoRA ones
   as their low-rank factors, which ``inspect`` reports);
4. composes the tasks' vectors by task arithmetic with ``mlflow-taskvec compose --register``:
   the full vectors on the sentence-transformers base, the LoRA vectors on the transformers base;
   and, LoRA to LoRA (``output_format: peft``, docs/lora-merging.md), the LoRA vectors into one PEFT
   adapter by task arithmetic (exact) and by ties, registered as ``mlflow.transformers`` PEFT models;
5. loads the composites back through ``mlflow.sentence_transformers.load_model`` /
   ``mlflow.transformers.load_model`` (the LoRA-to-LoRA ones as ``PeftModel``) and through pyfunc (text in);
6. serves the full composite with ``mlflow models serve`` on 127.0.0.1 and posts sentences to it;
7. prints each task's test accuracy for the base, every fine-tune and every composite.

The ``mlflow-taskvec`` commands run in this process (the command line is printed before each),
so the models, tokenizer and tasks are loaded once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import text_tasks as T  # noqa: E402

SMALL = {"tasks": "sentiment,question,tense", "steps": 12, "lora_steps": 12, "batch_size": 8, "eval_limit": 48, "scale": 0.8, "lr": 1e-4, "lora_lr": 5e-3}
FULL = {"tasks": ",".join(T.TASKS), "steps": 40, "lora_steps": 40, "batch_size": 16, "eval_limit": None, "scale": 0.5, "lr": 1e-4, "lora_lr": 2e-3}
PIP = ["torch", "transformers", "sentence-transformers", "peft"]
EXAMPLE = ["the film was not good", "can she drive the car"]


@dataclass
class Result:
    """What a run made: registered versions (``models:/name/version``), accuracies, the server's answer."""

    tasks: list[str]
    base_st: str = ""
    base_hf: str = ""
    finetunes: dict[str, str] = field(default_factory=dict)  # "<task>" / "<task>-lora" -> logged model URI
    vectors: dict[str, str] = field(default_factory=dict)  # same keys -> registered vector version
    composites: dict[str, str] = field(default_factory=dict)  # "full" / "lora" / "lora-peft" / "lora-peft-ties" -> registered composite version
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> task -> accuracy
    inspect_lora: str = ""  # `inspect` of one LoRA vector
    pyfunc: dict[str, list] = field(default_factory=dict)  # "full" / "lora" -> pyfunc answer to EXAMPLE
    served: list = field(default_factory=list)  # the server's embeddings of EXAMPLE
    served_predictions: dict[str, list[str]] = field(default_factory=dict)  # task -> labels of EXAMPLE from the served embeddings
    seconds: dict[str, float] = field(default_factory=dict)  # step -> wall time

    def normalized(self, row: str, kind: str) -> float:
        """Mean over the tasks of ``row``'s accuracy over the ``kind`` ("full" / "lora") fine-tune's."""
        suffix = "" if kind == "full" else " LoRA"
        return sum(self.accuracy[row][t] / self.accuracy[f"fine-tune {t}{suffix}"][t] for t in self.tasks) / len(self.tasks)

    def table(self) -> str:
        lines = ["| model | " + " | ".join(self.tasks) + " | mean | normalized |", "|---" * (len(self.tasks) + 3) + "|"]
        for row, acc in self.accuracy.items():
            mean = sum(acc[t] for t in self.tasks) / len(self.tasks)
            kind = "lora" if "LoRA" in row else "full"
            norm = f"{self.normalized(row, kind):.3f}" if row.startswith("composite") else ""
            lines.append(f"| {row} | " + " | ".join(f"{acc[t]:.3f}" for t in self.tasks) + f" | {mean:.3f} | {norm} |")
        return "\n".join(lines)


def taskvec(*args: str) -> str:
    """Run ``mlflow-taskvec ARGS`` in this process; echo and return its output (an error raises)."""
    from mlflow_taskvec.cli import main as cli

    line = "mlflow-taskvec " + " ".join(shlex.quote(str(a)) for a in args)
    print(f"$ {line}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main([str(a) for a in args], prog_name="mlflow-taskvec", standalone_mode=False)
        except Exception as exc:
            raise RuntimeError(f"{line} failed: {exc}") from None
    print(out.getvalue(), end="", flush=True)
    return out.getvalue()


def registered(output: str) -> str:
    match = re.search(r"^registered: (models:/\S+)", output, re.M)
    if not match:
        raise RuntimeError(f"no registered version in: {output!r}")
    return match.group(1)


# -- models ------------------------------------------------------------------------------------------


def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(T.model_dir()), device="cpu")


def hf_model():
    import transformers

    return transformers.AutoModel.from_pretrained(str(T.model_dir()), use_safetensors=True).eval()


def lora_model(rank: int, seed: int):
    import peft

    torch_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"])
    return peft.get_peft_model(hf_model(), config)


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def log_st(model, name: str, registered_model_name: str | None = None):
    import mlflow

    return mlflow.sentence_transformers.log_model(
        model, name=name, input_example=EXAMPLE, pip_requirements=PIP, registered_model_name=registered_model_name
    )


def log_hf(model, name: str, registered_model_name: str | None = None):
    import mlflow

    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": T.tokenizer()},
        name=name,
        task="feature-extraction",
        pip_requirements=PIP,
        registered_model_name=registered_model_name,
    )


def accuracies(model, tasks: list[str], limit: int | None) -> dict[str, float]:
    return {t: T.accuracy(model, t, "test", limit) for t in tasks}


# -- the steps -----------------------------------------------------------------------------------------


def log_bases(args, result: Result) -> None:
    import mlflow

    with mlflow.start_run(run_name="base"):
        st = log_st(sentence_transformer(), "minilm-st", f"{args.prefix}-minilm-st")
        hf = log_hf(hf_model(), "minilm-hf", f"{args.prefix}-minilm-hf")
    result.base_st = f"models:/{args.prefix}-minilm-st/{st.registered_model_version}"
    result.base_hf = f"models:/{args.prefix}-minilm-hf/{hf.registered_model_version}"
    print(f"bases: {result.base_st} (sentence_transformers), {result.base_hf} (transformers)", flush=True)


def finetune(args, result: Result, task: str, lora: bool) -> None:
    """Fine-tune, evaluate on every task and log (its own run), register its task vector."""
    import mlflow

    key, steps, lr = (f"{task}-lora", args.lora_steps, args.lora_lr) if lora else (task, args.steps, args.lr)
    with mlflow.start_run(run_name=f"finetune-{key}") as run:
        mlflow.log_params({"task": task, "lora": lora, "steps": steps, "lr": lr, "batch_size": args.batch_size, **({"rank": args.lora_rank} if lora else {})})
        start = time.perf_counter()
        model = T.train(lora_model(args.lora_rank, args.seed) if lora else sentence_transformer(), task, steps, lr, args.batch_size, args.seed)
        seconds = time.perf_counter() - start
        info = log_hf(model, "finetuned") if lora else log_st(model, "finetuned")
        acc = result.accuracy[f"fine-tune {task}{' LoRA' if lora else ''}"] = accuracies(model, result.tasks, args.eval_limit)
        mlflow.log_metrics({"train_seconds": seconds, **{f"{t}.accuracy": a for t, a in acc.items()}}, model_id=info.model_id)
        run_id = run.info.run_id
    print(f"fine-tuned {key} in {seconds:.1f} s: {info.model_uri}", flush=True)
    result.finetunes[key] = info.model_uri
    base = result.base_hf if lora else result.base_st
    name = f"{args.prefix}-{task}-{'lora-' if lora else ''}vector"
    out = taskvec("extract", "--base", base, "--finetuned", info.model_uri, "--task", task, "--register", name, "--run-id", run_id)
    result.vectors[key] = registered(out)


# LoRA-to-LoRA composites (output_format: peft): the LoRA vectors merged into one PEFT adapter on the
# transformers base, registered as an mlflow.transformers PEFT model (docs/lora-merging.md)
PEFT_KINDS = {"lora-peft": ("task_arithmetic", {}), "lora-peft-ties": ("ties", {"density": 0.5})}
ROWS = {"full": "composite (full)", "lora": "composite (LoRA)", "lora-peft": "composite (LoRA to LoRA, task arithmetic)", "lora-peft-ties": "composite (LoRA to LoRA, ties)"}


def compose(args, result: Result, kind: str, folder: Path) -> None:
    lora = kind.startswith("lora")
    base = result.base_hf if lora else result.base_st
    suffix = f"-{kind}" if lora else ""
    method, params = PEFT_KINDS.get(kind, ("task_arithmetic", {}))
    recipe = {
        "base": base,
        "method": method,
        "scale": args.scale,
        "vectors": [{"vector": result.vectors[f"{t}{'-lora' if lora else ''}"]} for t in result.tasks],
        **({"params": params} if params else {}),
        **({"output_format": "peft"} if kind in PEFT_KINDS else {}),
    }
    if args.evaluate:  # the registered version then carries each task's metrics against the base and fine-tunes
        recipe["evaluation"] = {"evaluator": "text_tasks:evaluate", "tasks": result.tasks, "split": "test"}
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), "utf-8")
    out = taskvec("compose", path, "--register", f"{args.prefix}-composite{suffix}")
    result.composites[kind] = registered(out)


def load_back(args, result: Result) -> None:
    """Both composites through their HF flavor (their accuracy rows) and through pyfunc (text in)."""
    import mlflow
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = mlflow.sentence_transformers.load_model(result.composites["full"])
        components = mlflow.transformers.load_model(result.composites["lora"], return_type="components")
        result.accuracy["composite (full)"] = accuracies(st, result.tasks, args.eval_limit)
        result.accuracy["composite (LoRA)"] = accuracies(components["model"], result.tasks, args.eval_limit)
        for kind in PEFT_KINDS:  # a PeftModel on the base, its adapter the merged one
            if kind in result.composites:
                peft_model = mlflow.transformers.load_model(result.composites[kind], return_type="components")["model"]
                result.accuracy[ROWS[kind]] = accuracies(peft_model, result.tasks, args.eval_limit)
        # sentence-transformers' pyfunc embeds each sentence; MLflow's feature-extraction pyfunc of the
        # transformers flavor answers one text with its token features
        for kind, text in (("full", EXAMPLE), ("lora", EXAMPLE[0])):
            answer = np.asarray(mlflow.pyfunc.load_model(result.composites[kind]).predict(text))
            result.pyfunc[kind] = answer.tolist()
            print(f"pyfunc of {result.composites[kind]}: {answer.shape} for {text!r}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args, result: Result, folder: Path) -> None:
    """``mlflow models serve`` of the full composite; posts ``EXAMPLE`` and stops the server."""
    import mlflow
    import torch

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", result.composites["full"], "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    print("$ " + " ".join(shlex.quote(c) for c in command[2:]), flush=True)
    log_path = folder / "serve.log"
    # the server runs uvicorn from this interpreter's environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + args.serve_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow models serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow models serve was not up after {args.serve_timeout} s: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": EXAMPLE}).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                result.served = json.loads(response.read())["predictions"]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)
    embeddings = torch.tensor(result.served, dtype=torch.float32)
    for task in result.tasks:
        result.served_predictions[task] = [T.LABELS[task][i] for i in (embeddings @ T.head(task).T).argmax(1).tolist()]
    print(f"served {url}: " + "; ".join(f"{t}: {p}" for t, p in result.served_predictions.items()), flush=True)


def run(args) -> Result:
    import mlflow

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    if args.experiment:
        mlflow.set_experiment(args.experiment)
    result = Result(tasks=args.tasks)

    @contextlib.contextmanager
    def timed(step: str):
        start = time.perf_counter()
        yield
        result.seconds[step] = result.seconds.get(step, 0.0) + time.perf_counter() - start

    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="taskvec-text-") as tmp:
        warnings.simplefilter("ignore")  # transformers' and MLflow's advice on every log_model call
        with timed("log bases"):
            log_bases(args, result)
        with timed("evaluate the base"):
            result.accuracy["base"] = accuracies(sentence_transformer(), result.tasks, args.eval_limit)
        for lora in (False, True):
            for task in result.tasks:
                with timed("fine-tune, evaluate, log, extract"):
                    finetune(args, result, task, lora)
        result.inspect_lora = taskvec("inspect", result.vectors[f"{result.tasks[0]}-lora"], "--top", "0")
        with timed("compose, register"):
            for kind in ("full", "lora", *(PEFT_KINDS if args.lora_to_lora else ())):
                compose(args, result, kind, Path(tmp))
        with timed("load back, evaluate"):
            load_back(args, result)
        if args.serve:
            with timed("serve"):
                serve(args, result, Path(tmp))
    print(f"\ntest accuracy ({', '.join(result.tasks)}; composites: task arithmetic, scale {args.scale}):\n{result.table()}", flush=True)
    print("seconds: " + ", ".join(f"{step} {s:.1f}" for step, s in result.seconds.items()), flush=True)
    return result


# -- arguments ----------------------------------------------------------------------------------------


def _tasks(value: str) -> list[str]:
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in T.TASKS]
    if unknown or len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise argparse.ArgumentTypeError(f"{value!r}: give two or more distinct tasks, comma-separated, of {', '.join(T.TASKS)}")
    return tasks


def _positive(kind):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or number <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} is not a positive {kind.__name__}")
        return number

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="The setting of docs/lora-hf.md's table: every task, 40 steps of 16, the whole test split, evaluation on registration.")
    parser.add_argument("--tasks", type=_tasks, default=None, help=f"Comma-separated tasks of {', '.join(T.TASKS)} (small: {SMALL['tasks']}).")
    parser.add_argument("--steps", type=_positive(int), default=None, help=f"Full fine-tuning steps (small: {SMALL['steps']}, full: {FULL['steps']}).")
    parser.add_argument("--lora-steps", type=_positive(int), default=None, help=f"LoRA fine-tuning steps (small: {SMALL['lora_steps']}, full: {FULL['lora_steps']}).")
    parser.add_argument("--batch-size", type=_positive(int), default=None, help=f"Sentences per step (small: {SMALL['batch_size']}, full: {FULL['batch_size']}).")
    parser.add_argument("--lr", type=_positive(float), default=None, help=f"Full fine-tuning learning rate, AdamW (small: {SMALL['lr']}, full: {FULL['lr']}).")
    parser.add_argument("--lora-lr", type=_positive(float), default=None, help=f"LoRA learning rate, AdamW (small: {SMALL['lora_lr']}, full: {FULL['lora_lr']}).")
    parser.add_argument("--lora-rank", type=_positive(int), default=8, help="LoRA rank r (lora_alpha = 2r) on query and value.")
    parser.add_argument("--scale", type=_positive(float), default=None, help=f"The composites' task-arithmetic scale (small: {SMALL['scale']}, full: {FULL['scale']}).")
    parser.add_argument("--eval-limit", type=_positive(int), default=None, help="Test sentences per task for the table (default: all 200; small: 48).")
    parser.add_argument("--evaluate", action="store_true", default=None, help="Add the recipe's evaluation block (metrics on the registered composites; on with --full).")
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="Skip mlflow models serve.")
    parser.add_argument("--serve-timeout", type=_positive(int), default=120, help="Seconds to wait for the server to answer /ping.")
    parser.add_argument("--prefix", default="text", help="Registered model names start with this.")
    parser.add_argument("--seed", type=int, default=0, help="Mini-batch order and LoRA initialisation.")
    parser.add_argument("--no-lora-to-lora", dest="lora_to_lora", action="store_false",
                        help="Skip the LoRA-to-LoRA composites (the LoRA vectors merged into one PEFT adapter: task arithmetic, ties).")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI).")
    parser.add_argument("--experiment", default=None, help="Experiment name (default: MLFLOW_EXPERIMENT_ID / the default experiment).")
    args = parser.parse_args(argv)
    preset = FULL if args.full else SMALL
    for key in ("steps", "lora_steps", "batch_size", "scale", "lr", "lora_lr"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.tasks is None:
        args.tasks = _tasks(preset["tasks"])
    if args.eval_limit is None:
        args.eval_limit = preset["eval_limit"]
    if args.evaluate is None:
        args.evaluate = args.full
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", args.prefix):
        parser.error(f"--prefix {args.prefix!r}: letters, digits, '-' and '_' only")
    return args


def main(argv: list[str] | None = None) -> Result:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
