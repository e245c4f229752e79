"""AdaMerging variants on the digits leaderboard's eight fine-tunes, in memory, per seed.

    python examples/digits/adamerging_variants.py 3 4

Per seed: the pipeline's base and its eight leaderboard fine-tunes; task arithmetic with
the scale picked on the validation split (0..1 step 0.05); then AdaMerging
(``learn_coefficients``, the function ``search`` strategy ``adamerging`` runs) with the
example's settings (``pipeline.ADAMERGING``) and variants of them. Each figure is the
mean normalized accuracy on the test split (composite / fine-tune, eight tasks).
"""
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import digits_tasks as D
from pipeline import ADAMERGING, BOARD_LR, BOARD_STEPS, LEADERBOARD_TASKS as TASKS
from mlflow_taskvec.mlflow.adamerging import learn_coefficients
from mlflow_taskvec.recipe import AdaMerging

def run(seed, variants):
    base = D.train(D.build_model(seed), "digits", steps=300, seed=seed)
    b = {n: t.detach().clone() for n, t in base.state_dict().items()}
    fts = {t: D.train(copy.deepcopy(base), t, steps=BOARD_STEPS, lr=BOARD_LR, optimizer="sgd") for t in TASKS}
    own = {t: D.accuracy(fts[t], t, "test") for t in TASKS}
    vecs = [{n: fts[t].state_dict()[n] - b[n] for n in b} for t in TASKS]
    def norm(state):
        m = copy.deepcopy(base); m.load_state_dict(state)
        return sum(D.accuracy(m, t, "test") / own[t] for t in TASKS) / len(TASKS)
    # task arithmetic, scale picked on validation as the pipeline's grid (0..1 step 0.05)
    def val(s):
        m = copy.deepcopy(base); m.load_state_dict({n: b[n] + s * sum(v[n] for v in vecs) for n in b})
        return sum(D.accuracy(m, t, "validation") / D.accuracy(fts[t], t, "validation") for t in TASKS)
    s = max([round(0.05 * i, 2) for i in range(21)], key=lambda s: (val(s), -s))
    ta = norm({n: b[n] + s * sum(v[n] for v in vecs) for n in b})
    print(f"seed {seed}: TA {ta:.3f} (scale {s})", flush=True)
    for name, over in variants:
        t0 = time.time()
        settings = AdaMerging(**{**ADAMERGING, **over})
        learned = learn_coefficients(copy.deepcopy(base), b, vecs, [1.0] * 8, list(TASKS), D.unlabeled, list(TASKS), "validation", settings)
        layer_of = {n: j for j, layer in enumerate(learned.layers) for n in learned.tensors[layer]}
        lam = learned.coefficients.float()
        state = {n: b[n] + sum((lam[i, layer_of[n]] if n in layer_of else settings.init) * vecs[i][n] for i in range(8)) for n in b}
        r = norm(state)
        print(f"seed {seed}: {name}: {r:.3f} ({100 * (r - ta):+.1f} vs TA), entropy {learned.initial_entropy:.3f} -> {learned.final_entropy:.3f} ({time.time() - t0:.0f} s)", flush=True)

variants = [("layer-wise (the example's)", {}), ("task-wise", {"layerwise": False}), ("layer-wise, 600 steps", {"steps": 600}), ("task-wise, init 0.2", {"layerwise": False, "init": 0.2})]
for seed in map(int, sys.argv[1:]):
    run(seed, variants)
