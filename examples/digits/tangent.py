"""Standard against linearized fine-tunes on the digits leaderboard's eight tasks (arXiv 2305.12827).

    python examples/digits/tangent.py --seeds 0 1 2 3 4

Per seed, as the pipeline does: pre-train the base, fine-tune it on the eight tasks
(``LEADERBOARD_TASKS``, ``BOARD_STEPS`` SGD steps at ``BOARD_LR``) once as usual and once
linearized (``digits_tasks.train(mode="linear")``); then, for each kind, in memory (no
MLflow, the same functions the commands call):

- the mean weight disentanglement error over the 28 pairs, inside the unit box
  (``mlflow_taskvec.disentanglement``, the validation inputs; ``--grid`` sets it);
- task arithmetic's mean normalized accuracy: the scale picked on the validation
  split from ``--scales`` (the mean of composite / fine-tune accuracy over the eight
  tasks), reported on the test split. Linear fine-tunes, and their composites, are
  evaluated linearized at the base, as they were trained.

Prints one markdown row per seed and kind, and the mean over seeds.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_tasks as D  # noqa: E402
from pipeline import BOARD_LR, BOARD_STEPS, LEADERBOARD_TASKS  # noqa: E402

from mlflow_taskvec.disentanglement import coefficient_grid, disentanglement_error  # noqa: E402


def scored(net, base, mode: str):
    return D.linearized(net, base) if mode == "linear" else net


def with_weights(base, state):
    net = copy.deepcopy(base)
    net.load_state_dict(state)
    return net.eval()


def measure(seed: int, mode: str, alphas: list[float], scales: list[float], base, steps: int = BOARD_STEPS) -> dict:
    started = time.perf_counter()
    b = {n: t.detach().clone() for n, t in base.state_dict().items()}
    vectors, own = {}, {}
    for task in LEADERBOARD_TASKS:
        ft = D.train(copy.deepcopy(base), task, steps=steps, lr=BOARD_LR, optimizer="sgd", mode=mode)
        vectors[task] = {n: t.detach() - b[n] for n, t in ft.state_dict().items()}
        model = scored(ft, base, mode)
        own[task] = {split: D.accuracy(model, task, split) for split in ("validation", "test")}
    errors = []
    for t1, t2 in itertools.combinations(LEADERBOARD_TASKS, 2):
        r = disentanglement_error(copy.deepcopy(base), b, (vectors[t1], vectors[t2]), (t1, t2), (t1, t2), D.unlabeled, "validation",
                                  alphas, linear=mode == "linear")
        errors.append(r.unit_box_mean)

    def normalized(scale: float, split: str) -> float:
        state = {n: b[n] + scale * sum(v[n] for v in vectors.values()) for n in b}
        model = scored(with_weights(base, state), base, mode)
        return sum(D.accuracy(model, t, split) / own[t][split] for t in LEADERBOARD_TASKS) / len(LEADERBOARD_TASKS)

    best = max(scales, key=lambda s: (normalized(s, "validation"), -s))
    return {
        "seed": seed, "mode": mode, "disentanglement": sum(errors) / len(errors), "scale": best,
        "ta_normalized": normalized(best, "test"), "finetuned": sum(o["test"] for o in own.values()) / len(own),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--grid", type=float, nargs=3, default=[-1.0, 1.0, 0.5], metavar=("LOW", "HIGH", "STEP"),
                        help="the disentanglement grid (default: the unit box, whose mean is the figure)")
    parser.add_argument("--scales", type=float, nargs=3, default=[0.0, 1.0, 0.05], metavar=("LOW", "HIGH", "STEP"))
    parser.add_argument("--steps", type=int, default=BOARD_STEPS, help="fine-tuning steps")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--modes", nargs="+", default=["standard", "linear"], choices=D.MODES)
    args = parser.parse_args()
    alphas, scales = coefficient_grid(*args.grid), coefficient_grid(*args.scales)
    print("| seed | fine-tuning | mean disentanglement error (unit box, 28 pairs) | TA scale | TA mean normalized accuracy | fine-tunes' mean accuracy |")
    print("|---|---|---|---|---|---|")
    rows = []
    for seed in args.seeds:
        base = D.train(D.build_model(seed), "digits", steps=args.pretrain_steps, seed=seed)
        for mode in args.modes:
            r = measure(seed, mode, alphas, scales, base, args.steps)
            rows.append(r)
            print(f"| {seed} | {mode} | {r['disentanglement']:.3f} | {r['scale']:g} | {r['ta_normalized']:.3f} | {r['finetuned']:.3f} |", flush=True)
            print(f"  ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        print(f"| mean ({len(mine)} seeds) | {mode} | {sum(r['disentanglement'] for r in mine) / len(mine):.3f} | | "
              f"{sum(r['ta_normalized'] for r in mine) / len(mine):.3f} | {sum(r['finetuned'] for r in mine) / len(mine):.3f} |")


if __name__ == "__main__":
    main()
