"""Composing a model from a recipe: the one place that turns a recipe's inputs into task
vectors and calls the engine.

The recipe's references must be local here (paths, or schemes of the reference table);
the MLflow layer resolves registry references, checks the recipe's policy and hands
over a recipe of local paths (``mlflow_taskvec.mlflow.inputs``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.adapter_merge import AdapterMergeResult, check_adapter_bases, merge_to_adapter
from mlflow_taskvec.engine.checkpoint import Checkpoint
from mlflow_taskvec.engine.compressed import CompressionResult, check_settings
from mlflow_taskvec.engine.compressed import compress as compress_to_layout
from mlflow_taskvec.engine.lora import LoraExport, export_lora
from mlflow_taskvec.engine.merging import MergeResult, merge, merge_to
from mlflow_taskvec.engine.streaming import STORAGE_DTYPES, parse_dtype
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.writer import write_text_atomically
from mlflow_taskvec.errors import ParameterError, TaskVecError
from mlflow_taskvec.modelcard import CARD_NAME, hub_name_of, model_card
from mlflow_taskvec.progress import progress_bar
from mlflow_taskvec.recipe import RECIPE_FORMAT, Recipe
from mlflow_taskvec.references import absolute, is_local, load_vector, open_reference
from mlflow_taskvec.tables import smaller_by


@dataclass
class Extraction:
    """A task vector ``finetuned - base`` (not yet saved) and what a report of it says."""

    vector: TaskVector
    base: Checkpoint
    finetuned: Checkpoint

    @property
    def one_sided(self) -> list[str]:
        """Skipped tensors that only one of the two checkpoints has (integer or bool buffers)."""
        if self.vector.low_rank_source is not None:  # an adapter's vector: the base decides alone
            return []
        return [n for n in self.vector.skipped if (n in self.base) != (n in self.finetuned)]

    @property
    def low_rank_sizes(self) -> tuple[int, int] | None:
        """``(stored bytes, dense bytes)`` when the vector is saved as low-rank factors, else None."""
        low_rank = self.vector.low_rank_source
        if low_rank is None:
            return None
        kept = low_rank.subset(self.vector.names)
        return kept.stored_bytes, kept.dense_bytes


    def save(
        self,
        output: "str | os.PathLike",
        dtype: str | None = None,
        max_shard_size: str | None = None,
        overwrite: bool = False,
        allow_nonfinite: bool = False,
        device: str | None = None,
        threads: int | None = None,
        quiet: bool = True,
    ) -> "Extracted":
        """Write the vector to ``output`` (as ``TaskVector.save``; a progress bar on a terminal
        unless ``quiet``) and report it."""
        vector = self.vector
        step, close = progress_bar(len(vector.names), "extract", "tensor", quiet)
        try:
            fingerprint = vector.save(
                output, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, allow_nonfinite=allow_nonfinite, progress=step,
                device=device, threads=threads,
            )
        finally:
            close()
        return Extracted(Path(output), len(vector.names), vector.num_parameters, len(vector.skipped), self.one_sided, self.low_rank_sizes,
                         vector.base_fingerprint, fingerprint)


@dataclass
class Extracted:
    """A task vector ``extract`` wrote: where, its counts and fingerprints."""

    output: Path
    num_tensors: int
    num_parameters: int
    skipped: int
    one_sided: list[str]  # skipped tensors only one side has
    low_rank_sizes: tuple[int, int] | None  # (stored, dense) bytes of a vector saved as factors
    base_fingerprint: str
    fingerprint: str

    def lines(self) -> list[str]:
        """The report ``mlflow-taskvec extract`` prints."""
        lines = [f"task vector: {self.output}", f"tensors: {self.num_tensors}  parameters: {self.num_parameters}  skipped: {self.skipped}"]
        if self.one_sided:
            lines.append("skipped, in one of the two only (integer or bool buffers): " + ", ".join(self.one_sided))
        if self.low_rank_sizes is not None:
            stored, dense = self.low_rank_sizes
            lines.append(f"stored low-rank: {stored} bytes (dense: {dense} bytes)")
        return [*lines, f"base fingerprint: {self.base_fingerprint}", f"fingerprint: {self.fingerprint}"]


def extract(
    base: "str | os.PathLike",
    finetuned: "str | os.PathLike",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    task: str | None = None,
) -> Extraction:
    """The task vector of the fine-tune ``finetuned`` (a checkpoint or a PEFT adapter) over ``base``,
    both references of the scheme table (local paths, or what an installed scheme resolves)."""
    base_ckpt = open_reference(base)
    ft_ckpt = open_reference(finetuned, base=base_ckpt)
    vector = TaskVector.extract(base_ckpt, ft_ckpt, include=include or None, exclude=exclude or None, task=task or None)
    return Extraction(vector, base_ckpt, ft_ckpt)


def needs_mlflow(recipe: Recipe, require_alias: str | None = None) -> bool:
    """Whether composing ``recipe`` needs the MLflow layer (which resolves references and checks
    the approval policy): a policy or a required alias to check, or a reference that is not a
    path on this machine. Decided without importing MLflow."""
    return require_alias is not None or recipe.policy is not None or not all(is_local(ref) for ref in recipe.references)


def open_base(recipe: Recipe) -> Checkpoint:
    return open_reference(recipe.base, recipe.source_dir)


def vectors_of(recipe: Recipe, base: Checkpoint) -> list[TaskVector]:
    """The recipe's inputs as lazy task vectors: saved ones loaded, fine-tunes extracted against ``base``."""
    vectors = []
    for i, entry in enumerate(recipe.vectors):
        try:
            if entry.vector is not None:
                v = load_vector(entry.vector, recipe.source_dir, base=base)
            else:
                ft = open_reference(entry.finetuned, recipe.source_dir, base=base)
                v = TaskVector.extract(base, ft, include=entry.include, exclude=entry.exclude, task=entry.task)
        except TaskVecError as exc:
            raise TaskVecError(f"vectors[{i}]: {exc}") from None
        vectors.append(v)
    return vectors


def check_same_base(recipe: Recipe, base_fingerprint: str, vector_base_fingerprints: list[str]) -> None:
    """Refuse, before composing, an input extracted from another base than the recipe's."""
    for i, (entry, fp) in enumerate(zip(recipe.vectors, vector_base_fingerprints)):
        if fp != base_fingerprint:
            raise TaskVecError(
                f"vectors[{i}] was extracted from a different base: {entry.ref} records base fingerprint {fp[:16]}, "
                f"the recipe's base {recipe.base} has {base_fingerprint[:16]}"
            )


def checked_inputs(recipe: Recipe) -> tuple[Checkpoint, list[TaskVector]]:
    """The recipe's base and input vectors, every input checked to come from that base."""
    base = open_base(recipe)
    vectors = vectors_of(recipe, base)
    check_same_base(recipe, base.fingerprint(), [v.base_fingerprint for v in vectors])
    return base, vectors


def _options(recipe: Recipe) -> dict:
    return dict(
        method=recipe.method,
        scale=recipe.scale,
        params=recipe.params,
        dtype=recipe.dtype,
        compute_dtype=recipe.compute_dtype,
        allow_nonfinite=recipe.allow_nonfinite,
        device=recipe.device,
    )


def compose(recipe: Recipe, threads: int | None = None) -> dict[str, torch.Tensor]:
    """What the recipe says, as an in-memory state dict (how search candidates are built);
    ``threads`` as for ``merge`` (where it runs, not what it is: not in the recipe)."""
    base, vectors = checked_inputs(recipe)
    return merge(base, vectors, [e.weight for e in recipe.vectors], threads=threads, **_options(recipe))


def output_path(recipe: Recipe, output: "str | os.PathLike | None" = None) -> Path:
    """Where a composite goes: ``output``, else the recipe's ``output`` relative to the recipe's folder."""
    target = output if output is not None else recipe.output
    if target is None:
        raise TaskVecError("no output: set 'output' in the recipe or pass --output")
    if output is None and recipe.source_dir is not None and not Path(target).is_absolute():
        return recipe.source_dir / target
    return Path(target)


def compose_to(
    recipe: Recipe,
    output: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    progress=None,
    recorded: Recipe | None = None,
    threads: int | None = None,
) -> MergeResult:
    """Compose what the recipe says into ``output`` (default: the recipe's ``output``, relative
    to the recipe's folder); the output's metadata records ``recorded`` (default: the recipe)
    and its digest. ``threads``: the engine's compute threads (default: the machine's cores;
    the output is the same bits for any number)."""
    target = output_path(recipe, output)
    base, vectors = checked_inputs(recipe)
    recorded = recorded or recipe
    meta = {
        meta_keys.FORMAT_VERSION: RECIPE_FORMAT,
        meta_keys.KIND: meta_keys.COMPOSITE,
        meta_keys.METHOD: recorded.method,
        meta_keys.RECIPE: recorded.canonical_json(),
        meta_keys.RECIPE_SHA256: recorded.sha256(),
        **(metadata or {}),
    }
    inputs = [
        {"ref": entry.ref, "weight": entry.weight, "task": entry.task or v.task, "fingerprint": _input_fingerprint(v)}
        for entry, v in zip(recorded.vectors, vectors)
    ]
    base_model = hub_name_of(base.directory) or recorded.base

    def card(fingerprint: str) -> dict[str, str]:  # a folder output is a drop-in HF model: its card replaces the base's
        return {CARD_NAME: model_card(recorded, base_model, inputs, fingerprint, base.fingerprint())}

    result = merge_to(
        base,
        vectors,
        [e.weight for e in recipe.vectors],
        target,
        max_shard_size=recipe.max_shard_size,
        overwrite=overwrite,
        metadata=meta,
        progress=progress,
        threads=threads,
        extra_files=card,  # written into the partial: the folder appears with its card
        **_options(recipe),
    )  # its stages (writing, final-move, done) are marked by the output claim (engine/output.py)
    return result


def base_model_name(recipe: Recipe, base: Checkpoint) -> str:
    """What a PEFT adapter records as ``base_model_name_or_path``: the base's Hub name when its
    folder says it, else the base folder's absolute path, else the recipe's reference."""
    if base.directory is not None:
        return hub_name_of(base.directory) or str(Path(base.directory).resolve())
    return recipe.base


def compose_to_adapter(
    recipe: Recipe,
    output: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    progress=None,
    recorded: Recipe | None = None,
    base_model_name_or_path: str | None = None,
) -> AdapterMergeResult:
    """Compose what the recipe says into one PEFT LoRA adapter folder (``output_format: peft``;
    ``engine.adapter_merge``), never the dense model; its weights' metadata records ``recorded``."""
    if recipe.max_shard_size is not None:
        raise TaskVecError("max_shard_size: a PEFT adapter (output_format: peft) is one file, not shards")
    target = output_path(recipe, output)
    check_adapter_bases([(i, absolute(e.ref, recipe.source_dir)) for i, e in enumerate(recipe.vectors) if is_local(e.ref)])
    base, vectors = checked_inputs(recipe)
    recorded = recorded or recipe
    meta = {
        meta_keys.FORMAT_VERSION: RECIPE_FORMAT,
        meta_keys.METHOD: recorded.method,
        meta_keys.RECIPE: recorded.canonical_json(),
        meta_keys.RECIPE_SHA256: recorded.sha256(),
    }
    return merge_to_adapter(
        base,
        vectors,
        [e.weight for e in recipe.vectors],
        target,
        method=recipe.method,
        scale=recipe.scale,
        params=recipe.params,
        rank=recipe.output_rank,
        energy=recipe.output_energy,
        svd=recipe.output_svd or "exact",
        base_model_name_or_path=base_model_name_or_path or base_model_name(recorded, base),
        compute_dtype=recipe.compute_dtype,
        dtype=parse_dtype(recipe.dtype, "dtype", STORAGE_DTYPES) if recipe.dtype else torch.float32,
        allow_nonfinite=recipe.allow_nonfinite,
        overwrite=overwrite,
        metadata=meta,
        progress=progress,
    )


@dataclass
class Composed:
    """A composite (or PEFT adapter) ``compose`` wrote from a recipe, and the recipe it records."""

    recipe: Recipe  # as recorded: its references as the user gave them
    result: MergeResult | AdapterMergeResult

    def lines(self) -> list[str]:
        """The report ``mlflow-taskvec compose`` prints."""
        r, digest = self.result, f"recipe sha256: {self.recipe.sha256()}"
        if isinstance(r, AdapterMergeResult):
            return [*adapter_lines(r), digest]
        return [
            f"composite: {r.output}",
            f"method: {r.method}  scale: {r.scale}  weights: {r.weights}  params: {json.dumps(r.params)}",
            f"tensors: {r.num_tensors}  parameters: {r.num_parameters}  seconds: {r.seconds:.2f}",
            digest,
            f"fingerprint: {r.fingerprint}",
        ]


def adapter_lines(merged: AdapterMergeResult) -> list[str]:
    """A merged PEFT adapter as ``compose --format peft`` reports it: each module's rank and relative error."""
    lines = [
        f"adapter: {merged.output}",
        f"method: {merged.method}  scale: {merged.scale}  weights: {merged.weights}  params: {json.dumps(merged.params)}",
        f"r: {merged.r}  lora_alpha: {merged.r}  modules: {len(merged.modules)}" + (f"  rank_pattern: {len(merged.rank_pattern)} modules" if merged.rank_pattern else ""),
    ]
    width = max(len(m.name) for m in merged.modules)
    for m in merged.modules:
        how = "concatenated (exact)" if m.exact else f"relative error {m.relative_error:.4g}"
        lines.append(f"  {m.name:<{width}}  rank {m.rank:>4}  {how}" + ("  (embedding)" if m.embedding else ""))
    if merged.left_out:
        lines.append("not in the adapter (1-D deltas a LoRA adapter cannot hold): " + ", ".join(sorted(merged.left_out)))
    lines.append(f"largest relative Frobenius error: {merged.relative_error:.6g}  bytes written: {merged.bytes_written}  seconds: {merged.seconds:.2f}")
    return lines


def compose_recipe(
    recipe: Recipe,
    output: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    quiet: bool = True,
    threads: int | None = None,
    recorded: Recipe | None = None,
) -> Composed:
    """Compose a recipe of local references as its ``output_format`` says: the dense model
    (``compose_to``) or one PEFT adapter (``compose_to_adapter``), with a progress bar on a
    terminal unless ``quiet``. ``output`` and the recorded recipe are as for ``compose_to``."""
    recorded = recorded or recipe
    target = output_path(recorded, output)
    step, close = progress_bar(len(open_base(recipe).keys()), recorded.method, "tensor", quiet)
    try:
        if recorded.output_format == "peft":
            result = compose_to_adapter(recipe, output=target, overwrite=overwrite, progress=step, recorded=recorded)
        else:
            result = compose_to(recipe, output=target, overwrite=overwrite, progress=step, recorded=recorded, threads=threads)
    finally:
        close()
    return Composed(recorded, result)


@dataclass
class Compressed:
    """A task vector ``compress`` stored in a smaller layout: where (None when only registered)
    and the engine's report of it."""

    output: Path | None
    result: CompressionResult

    def lines(self) -> list[str]:
        """The report ``mlflow-taskvec compress`` prints."""
        r = self.result
        setting = ", ".join(f"{k} {v:g}" for k, v in r.settings.items())
        return [
            *([f"compressed vector: {self.output}"] if self.output is not None else []),
            f"format: {r.layout}" + (f" ({setting})" if setting else "") + "  tensors: " + ", ".join(f"{n} {e}" for e, n in sorted(r.encodings.items())),
            f"size: {r.stored_bytes} bytes stored, {r.dense_bytes} dense ({smaller_by(r.stored_bytes, r.dense_bytes)})",
            f"source fingerprint: {r.source_fingerprint}",
            f"fingerprint: {r.fingerprint}",
        ]


def compress_vector(
    ref: "str | os.PathLike",
    output: "str | os.PathLike",
    layout: str,
    density: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    base: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    device: str | None = None,
    quiet: bool = True,
) -> Compressed:
    """The task vector ``ref`` (a PEFT LoRA adapter's with its ``base``) stored at ``output`` in
    the ``layout`` (``engine.compressed``), with a progress bar on a terminal unless ``quiet``.
    The settings are checked before anything is read."""
    check_settings(layout, density, rank, energy)
    source = open_reference(ref, base=open_reference(base) if base else None)
    vector = TaskVector.load(source)
    step, close = progress_bar(len(vector.names), f"compress ({layout})", "tensor", quiet)
    try:
        result = compress_to_layout(vector, output, layout, density, rank, energy, source_fingerprint=source.fingerprint(), overwrite=overwrite,
                                    progress=step, device=device)
    finally:
        close()
    return Compressed(Path(output), result)


FACTOR_DTYPES = {k: v for k, v in STORAGE_DTYPES.items() if k != "float64"}  # what a LoRA adapter's factors are stored as


def factor_dtype(value: "str | torch.dtype") -> torch.dtype:
    """``value`` as one of ``FACTOR_DTYPES``; raises naming the parameter ``dtype``."""
    try:
        return parse_dtype(value, "dtype", FACTOR_DTYPES)
    except TaskVecError:
        raise ParameterError("dtype", f"{value!r} is not one of {', '.join(FACTOR_DTYPES)}") from None


@dataclass
class ExportedAdapter:
    """A PEFT LoRA adapter ``export-lora`` wrote, as the engine reports it (``LoraExport``)."""

    result: LoraExport

    def lines(self) -> list[str]:
        """The report ``mlflow-taskvec export-lora`` prints."""
        r = self.result
        lines = [
            f"adapter: {r.output}",
            f"r: {r.r}  lora_alpha: {r.r}  modules: {len(r.tensors)}" + (f"  rank_pattern: {len(r.rank_pattern)} modules" if r.rank_pattern else ""),
        ]
        width = max((len(t.name) for t in r.tensors), default=0)
        for t in r.tensors:
            lines.append(f"  {t.name:<{width}}  rank {t.rank:>4}  relative error {t.relative_error:.4g}" + ("  (embedding)" if t.embedding else ""))
        if r.saved_whole:
            lines.append(f"saved whole (modules_to_save): {len(r.saved_whole)} tensors")
        if r.left_out:
            share = sum(r.left_out.values())
            lines.append(f"not in the adapter ({share:.4%} of ||tau||^2; use --modules-to-save for them): " + ", ".join(sorted(r.left_out)))
        return [*lines, f"total relative Frobenius error: {r.relative_error:.6g}"]


def export_adapter(
    ref: "str | os.PathLike",
    output: "str | os.PathLike",
    base: "str | os.PathLike | None" = None,
    rank: int | None = None,
    energy: float | None = None,
    modules_to_save: Sequence[str] = (),
    dtype: "str | torch.dtype" = "float32",
    base_name: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
) -> ExportedAdapter:
    """The task vector ``ref``, or ``ref - base`` for a composite or fine-tune ``ref``, written as a
    PEFT LoRA adapter folder at ``output`` (``engine.lora.export_lora``: ``rank`` or ``energy``,
    ``modules_to_save``, the factors' ``dtype``), with a progress bar on a terminal unless
    ``quiet``. ``base_name`` (the adapter's ``base_model_name_or_path``) defaults to the local
    ``base`` folder's absolute path."""
    factor = factor_dtype(dtype)
    base_ckpt = open_reference(base) if base else None
    source = open_reference(ref, base=base_ckpt)
    kind = source.metadata().get(meta_keys.KIND, "checkpoint")
    if kind == meta_keys.TASK_VECTOR:
        vector = TaskVector.load(source)
    elif base_ckpt is not None:
        vector = TaskVector.extract(base_ckpt, source)
    else:
        raise TaskVecError(f"{ref}: is a {kind}, not a task vector: give its --base to export REF - BASE")
    if base_name is None and base_ckpt is not None and base_ckpt.directory is not None:
        base_name = str(base_ckpt.directory.resolve())
    step, close = progress_bar(len(vector.names), "export-lora", "tensor", quiet)
    try:
        result = export_lora(
            vector, output, rank=rank, energy=energy, modules_to_save=modules_to_save, base=base_ckpt,
            base_model_name_or_path=base_name, dtype=factor, overwrite=overwrite, progress=step,
        )
    finally:
        close()
    return ExportedAdapter(result)


def base_with_adapter(base: "Checkpoint | str | os.PathLike", adapter: "str | os.PathLike") -> dict[str, torch.Tensor]:
    """The state dict of ``base`` with the PEFT adapter folder ``adapter`` added (its delta at weight
    1, as PEFT's ``merge_and_unload``): what an ``output_format: peft`` composite is evaluated as."""
    return merge(base, [TaskVector.load(adapter, base=base)], [1.0])


def write_model_card(folder: Path, recipe: Recipe, base_model: str, inputs: list[dict], result: MergeResult, metrics=None, linear: bool = False) -> Path:
    """``folder/README.md``: the composite's model card (see ``modelcard``)."""
    card = model_card(recipe, base_model, inputs, result.fingerprint, result.base_fingerprint, metrics, linear=linear)
    write_text_atomically(folder / CARD_NAME, card)
    return folder / CARD_NAME


def _input_fingerprint(vector: TaskVector) -> str:
    """A saved vector's own fingerprint, or the fine-tune's a vector is extracted from."""
    term = vector.terms[0]
    return (term.stored or term.finetuned).fingerprint()
