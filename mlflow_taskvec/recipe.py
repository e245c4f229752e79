"""Merge recipes: the project's YAML config format, validated with clear messages.

```yaml
base: ./base                      # checkpoint reference
method: ties                      # any of `mlflow-taskvec methods`
scale: 0.8                        # lambda (or tensor-name globs -> numbers, like a weight)
params: {density: 0.2}            # the method's parameters (dare_*: seed too)
vectors:
  - vector: ./rotate.safetensors  # a saved task vector ...
    weight: 1.0                   # or per layer: {"*.layers.0.*": 0.2, "*": 0.8} (first match, "*" the default)
  - finetuned: ./flip             # ... or a fine-tune, extracted against base on the fly
    weight: -1.0                  # a negative weight negates (forgets) a task
dtype: bfloat16                   # output dtype (default: the base's)
compute_dtype: float32            # or float64
device: cuda                      # optional: cpu, cuda, cuda:N or auto (not part of the digest)
max_shard_size: 2GB               # write shards plus an index
output: ./merged
output_format: peft               # optional: one PEFT LoRA adapter, not the dense model (docs/lora-merging.md)
output_rank: 16                   # optional with peft: the rank of every module (or output_energy: 0.99)
policy:                           # optional: refuse inputs that lack an approval
  require_alias: approved         # every input must be a registered version carrying this alias
evaluation:                       # optional: metrics for the registry
  evaluator: digits_tasks:evaluate  # (model, task, split) -> {metric: value}
  tasks: [rotate, flip]
  control_tasks: [digits]
  split: test
```

Relative references are resolved against the recipe file's folder.

This module is data only: the schema, parsing and validation. ``compose.py``
turns a recipe into a model; the MLflow layer resolves its MLflow references and
checks its policy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mlflow_taskvec.callables import check_spec
from mlflow_taskvec.engine.checks import finite_number
from mlflow_taskvec.engine.device import device_name
from mlflow_taskvec.engine.coefficients import Coefficient, check_coefficient
from mlflow_taskvec.engine.methods import get_method, validate_params
from mlflow_taskvec.engine.streaming import COMPUTE_DTYPES, STORAGE_DTYPES, parse_dtype
from mlflow_taskvec.engine.writer import parse_size
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.safe_yaml import load_yaml, read_limited

RECIPE_FORMAT = "1"


def _finite_number(value: Any) -> float:
    try:
        return finite_number(value)
    except TaskVecError as exc:
        raise ValueError(str(exc)) from None


def _as_taskvec_error(value: Any, check, field: str) -> Any:
    try:
        return check(value)
    except TaskVecError as exc:
        # "field: why" -> "why"; a per-layer value's "field['glob']: why" -> "['glob']: why"
        message = str(exc)
        raise ValueError(message.removeprefix(f"{field}: ") if message.startswith(f"{field}: ") else message.removeprefix(field)) from None


class VectorEntry(BaseModel):
    """One input: a saved task vector, or a fine-tune to extract against the base."""

    model_config = ConfigDict(extra="forbid")

    vector: str | None = Field(None, description="reference to a saved task vector")
    finetuned: str | None = Field(None, description="reference to a fine-tuned checkpoint")
    weight: Coefficient = Field(1.0, description="w_i (negative to negate), or tensor-name globs -> numbers")
    task: str | None = None
    include: list[str] | None = Field(None, description="glob patterns of tensor names (finetuned only)")
    exclude: list[str] | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, value):
        return _as_taskvec_error(value, lambda v: check_coefficient(v, "weight"), "weight")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.vector is None) == (self.finetuned is None):
            raise ValueError("give exactly one of 'vector' or 'finetuned'")
        if self.vector is not None and (self.include or self.exclude):
            raise ValueError("'include'/'exclude' apply to 'finetuned' entries only")
        return self

    @property
    def ref(self) -> str:
        return self.vector if self.vector is not None else self.finetuned


class Evaluation(BaseModel):
    """How to evaluate the composite: ``evaluator(model, task, split) -> {metric: value}``."""

    model_config = ConfigDict(extra="forbid")

    evaluator: str = Field(description="package.module:function")
    tasks: list[str] = Field(min_length=1)
    control_tasks: list[str] = Field(default_factory=list)
    split: str = "test"
    references: bool = Field(True, description="also evaluate the base and each task's fine-tune")
    factory: str | None = Field(None, description="package.module:function building the module (default: the base's)")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("evaluator", "factory")
    @classmethod
    def _callable_spec(cls, value):
        if value is not None:
            try:
                check_spec(value, "")
            except TaskVecError as exc:
                raise ValueError(str(exc).strip()) from None
        return value


class Range(BaseModel):
    """A searched interval; ``step`` makes it a grid."""

    model_config = ConfigDict(extra="forbid")

    low: float
    high: float
    step: float | None = None
    log: bool = False

    @field_validator("low", "high", "step", mode="before")
    @classmethod
    def _numbers(cls, value):
        return None if value is None else _finite_number(value)

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step {self.step:g} must be positive")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    def __str__(self) -> str:
        return f"{self.low:g}..{self.high:g}" + (f" step {self.step:g}" if self.step else "")

    def grid(self) -> list[float]:
        if self.step is None:
            raise ValueError("a grid needs a step")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 10) for i in range(count)]


class AdaMerging(BaseModel):
    """``search.strategy: adamerging``: coefficients learned on unlabeled inputs (Yang et al., arXiv 2310.02575).

    ``lambda[i, layer]`` (task-wise: ``lambda[i]`` when ``layerwise`` is false) is learned by
    Adam, minimizing the mean Shannon entropy of the composite's predictions on the
    evaluator's ``unlabeled(task, split)`` inputs of the validation split. ``groups`` are
    tensor-name regexes: a tensor belongs to the first that matches, and the match's
    first capture group (else the whole match) names its layer.
    """

    model_config = ConfigDict(extra="forbid")

    layerwise: bool = True
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    init: float = 0.3
    batch_size: int | None = Field(None, ge=1, description="at most this many rows per step and task (default: the batches as given)")
    clamp: tuple[float, float] | None = Field((0.0, 1.0), description="[low, high] after each step; null: unbounded")
    groups: list[str] | None = Field(None, description="tensor-name regexes (default: one layer per name prefix up to its layer index)")
    device: str | None = Field(None, description="where the learning runs: cpu, cuda, cuda:N or auto (default: the recipe's device, else cpu)")

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        return _as_taskvec_error(value, lambda v: None if v is None else device_name(v), "device")

    @field_validator("init", "lr", mode="before")
    @classmethod
    def _numbers(cls, value):
        return _finite_number(value)

    @field_validator("clamp")
    @classmethod
    def _clamp(cls, value):
        if value is not None and (not all(math.isfinite(v) for v in value) or value[0] > value[1]):
            raise ValueError(f"{list(value)} is not [low, high] with low <= high")
        return value

    @field_validator("groups")
    @classmethod
    def _regexes(cls, value):
        if value is not None and not value:
            raise ValueError("an empty list names no layer (leave it out for the default)")
        for i, pattern in enumerate(value or []):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"[{i}] {pattern!r} is not a regular expression ({exc})") from None
        return value


class Search(BaseModel):
    """How ``mlflow-taskvec search`` picks coefficients (see docs/search.md).

    ``grid`` (the paper's protocol) tries every scale of ``scale``; ``optuna``
    samples the scale, each vector's weight (its magnitude in ``weights``, its
    sign from the recipe) and the method's ``params`` for ``trials`` trials.
    """

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["grid", "optuna", "adamerging"] = "grid"
    objective: str = Field("auto", description="auto | mean_normalized | negation | analogy | a metric name to maximize")
    metric: str = Field("accuracy", description="the evaluator's metric the objective is about")
    scale: Range = Field(default_factory=lambda: Range(low=0.0, high=1.0, step=0.05), description="default: the method's search_scale, step 0.05")
    weights: Range | None = None
    params: dict[str, Range | Literal["declared"]] | Literal["declared"] = Field(
        default_factory=dict, description="ranges per parameter; 'declared' takes the method's declared range (for every searchable parameter when given alone)"
    )
    trials: int = Field(30, ge=1)
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    storage: str | None = Field(None, description="optuna RDB URL, shared by several workers")
    study_name: str | None = None
    validation_split: str = "validation"
    control_min_ratio: float = Field(0.95, gt=0, description="negation and analogy: each control task keeps this share of the base's metric")
    # read by strategy adamerging, and by a leaderboard's adamerging row whatever the strategy
    adamerging: AdaMerging | None = Field(None, description="strategy adamerging's settings (default: AdaMerging())")

    @field_validator("objective")
    @classmethod
    def _objective(cls, value):
        if not value or value.strip() != value:
            raise ValueError(f"{value!r} is not an objective (auto, mean_normalized, negation, analogy, or a metric name)")
        return value

    @model_validator(mode="after")
    def _strategy_fits(self):
        if self.strategy == "grid":
            if self.scale.step is None:
                raise ValueError("strategy grid needs scale.step")
            if self.weights is not None or self.params:
                raise ValueError("weights and params ranges are searched by strategy optuna; grid searches the scale")
        if (self.storage or self.study_name) and self.strategy != "optuna":
            raise ValueError("storage and study_name apply to strategy optuna")
        if self.strategy == "adamerging" and (self.weights is not None or self.params):
            raise ValueError("weights and params ranges are searched by strategy optuna; adamerging learns the weights")
        return self


class Policy(BaseModel):
    """What a recipe's inputs must satisfy before anything is composed."""

    model_config = ConfigDict(extra="forbid")

    require_alias: str = Field(description="every input must be a registered model version carrying this alias")

    @field_validator("require_alias")
    @classmethod
    def _alias(cls, value):
        if not value.strip():
            raise ValueError("an alias name cannot be empty")
        return value


class Recipe(BaseModel):
    """A validated merge recipe."""

    model_config = ConfigDict(extra="forbid")

    base: str
    method: str = "task_arithmetic"
    scale: Coefficient = 1.0
    vectors: list[VectorEntry]
    params: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    compute_dtype: str = "float32"
    device: str | None = None  # where chunks are computed: cpu, cuda, cuda:N or auto (not part of the digest)
    max_shard_size: Any = None
    output: str | None = None
    allow_nonfinite: bool = False
    output_format: Literal["safetensors", "peft"] | None = Field(None, description="peft: write one PEFT LoRA adapter (docs/lora-merging.md); default: the dense model")
    output_rank: int | None = Field(None, ge=1, description="output_format peft: the rank of every merged module (default: the sum of the inputs' ranks)")
    output_energy: float | None = Field(None, gt=0, le=1, description="output_format peft: per module, the smallest rank keeping this share of ||delta||^2")
    evaluation: Evaluation | None = None
    search: Search | None = None
    policy: Policy | None = None
    _source_dir: Path | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> Path | None:
        """The folder of the recipe file: relative references are resolved against it."""
        return self._source_dir

    def derive(self, source: str, **changes: Any) -> "Recipe":
        """The one way to make a changed recipe: this one's fields with ``changes`` (a field set to
        None goes back to its default), validated again as a new recipe named ``source`` for its
        messages, resolving relative references against the same folder."""
        data = self.model_dump(exclude_unset=True)
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        return parse_recipe(data, source, self._source_dir)

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, value):
        return _as_taskvec_error(value, lambda v: check_coefficient(v, "scale"), "scale")

    @field_validator("method")
    @classmethod
    def _method(cls, value):
        return _as_taskvec_error(value, lambda v: get_method(v).name, "method")

    @field_validator("vectors")
    @classmethod
    def _vectors(cls, value):
        if not value:
            raise ValueError("the list is empty: give at least one vector")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value):
        return _as_taskvec_error(value, lambda v: None if v is None else str(parse_dtype(v, "dtype", STORAGE_DTYPES)).removeprefix("torch."), "dtype")

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        return _as_taskvec_error(value, lambda v: None if v is None else device_name(v), "device")

    @field_validator("compute_dtype")
    @classmethod
    def _compute_dtype(cls, value):
        return _as_taskvec_error(value, lambda v: str(parse_dtype(v, "compute_dtype", COMPUTE_DTYPES)).removeprefix("torch."), "compute_dtype")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise ValueError(f"{value!r} is not a size (use bytes, or a number with KB, MB, GB, KiB, MiB or GiB)")
        _as_taskvec_error(value, parse_size, "max_shard_size")
        return value

    @model_validator(mode="after")
    def _params(self):
        try:
            self.params = validate_params(get_method(self.method), self.params)
            get_method(self.method).check_input_count(len(self.vectors))
        except TaskVecError as exc:
            raise ValueError(str(exc)) from None
        if (self.output_rank is not None or self.output_energy is not None) and self.output_format != "peft":
            raise ValueError("output_rank and output_energy apply to output_format: peft")
        if self.output_rank is not None and self.output_energy is not None:
            raise ValueError("give at most one of output_rank or output_energy")
        if self.search is not None:
            self._declared_search_ranges()
            known = set(get_method(self.method).param_names)
            unknown = sorted(set(self.search.params) - known)
            if unknown:
                raise ValueError(f"search.params: {self.method} has no parameter {unknown[0]!r} (it has: {', '.join(sorted(known)) or 'none'})")
            method = get_method(self.method)
            for name, searched in self.search.params.items():
                spec = method.param(name)
                for bound in (searched.low, searched.high):  # the searched range stays inside the declared one
                    try:
                        spec.check(int(bound) if spec.type is int and float(bound).is_integer() else bound)
                    except TaskVecError as exc:
                        raise ValueError(f"search.{exc}") from None
        return self

    @property
    def references(self) -> list[str]:
        """The base and every input, as written."""
        return [self.base, *(e.ref for e in self.vectors)]

    def _declared_search_ranges(self) -> None:
        """The search's defaults from the method's declarations: its scale range, and each
        ``declared`` parameter's range (``params: declared``: every searchable one)."""
        method = get_method(self.method)
        search = self.search
        if "scale" not in search.model_fields_set:
            low, high = method.search_scale
            search.scale = Range(low=low, high=high, step=0.05)
        if search.params == "declared":
            search.params = {spec.name: "declared" for spec in method.searchable_params()}
        searchable = {spec.name: spec for spec in method.searchable_params()}
        for name, searched in search.params.items():
            if searched == "declared":
                if name not in searchable:
                    raise ValueError(f"search.params.{name}: {self.method} declares no search range for {name!r} (searchable: {', '.join(searchable) or 'none'})")
                low, high = searchable[name].search_bounds()
                search.params[name] = Range(low=low, high=high, step=1 if searchable[name].type is int else None)
        if search.weights is not None:
            per_layer = [i for i, e in enumerate(self.vectors) if isinstance(e.weight, dict)]
            if per_layer:
                raise ValueError(f"search.weights: vectors[{per_layer[0]}].weight is per layer; the search samples one number per vector")

    # -- identity -----------------------------------------------------------------
    def canonical_json(self) -> str:
        """The recipe as canonical JSON (sorted keys, no output path, no search settings): what a composite records.

        ``policy`` appears only when set, so recipes without one keep the digests they always had.
        A per-layer weight or scale is a list of [glob, value] pairs: its order (first match
        wins) is part of what it means, and sorted keys would lose it.
        """
        data = self.model_dump(exclude={"output", "search", "device"})  # where it runs is not what it is
        if data.get("policy") is None:
            data.pop("policy", None)
        for key in ("output_format", "output_rank", "output_energy"):  # only when set: older digests stay as they were
            if data.get(key) is None:
                data.pop(key, None)
        data["scale"] = _in_order(data["scale"])
        for entry in data["vectors"]:
            entry["weight"] = _in_order(entry["weight"])
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def as_yaml(self) -> str:
        """The recipe as a YAML file to compose it again (no output path, no search settings):
        a search's winning recipe, the recipe logged beside a registered composite."""
        return yaml.safe_dump(self.model_dump(exclude={"output", "search"}), sort_keys=False)


def _in_order(coefficient: Coefficient):
    """A per-layer coefficient as [glob, value] pairs in its order; a number as it is."""
    return [[glob, value] for glob, value in coefficient.items()] if isinstance(coefficient, dict) else coefficient


def _format_error(source: str, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    # a misspelled field also makes the real one "missing": name the misspelling
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ""
    for part in first["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        text = f"{loc}: required field is missing"
    elif first["type"] == "extra_forbidden":
        text = f"{loc}: unknown field"
    elif first["type"] in ("value_error", "assertion_error"):
        text = f"{loc}: {msg}" if loc else msg
    else:
        text = f"{loc}: {first.get('input')!r}: {msg}"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {text}{more}"


def parse_recipe(data: Any, source: str = "recipe", source_dir: "str | os.PathLike | None" = None) -> Recipe:
    """Validate a recipe given as data; relative references resolve against ``source_dir`` (default: the working folder)."""
    if not isinstance(data, dict):
        raise TaskVecError(f"{source}: a recipe must be a mapping of fields, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise TaskVecError(_format_error(source, exc)) from None
    recipe._source_dir = Path(source_dir).resolve() if source_dir is not None else None
    return recipe


def load_recipe(path: "str | os.PathLike") -> Recipe:
    """Read and validate a recipe file; its relative references resolve against the file's folder."""
    path = Path(path)
    try:
        text = read_limited(path)
    except FileNotFoundError:
        raise TaskVecError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskVecError(f"{path}: cannot read the recipe ({exc})") from None
    try:
        data = load_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TaskVecError(f"{path}: not valid YAML{where}") from None
    return parse_recipe(data, str(path), path.resolve().parent)
