"""The pyfunc wrappers of ``taskvec`` checkpoint models: tensors in, tensors out; an HF
checkpoint takes text (``mlflow.pyfunc.load_model`` and ``mlflow models serve`` use them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow.model_io import has_tokenizer


class CheckpointPyfunc:
    """``predict`` calls the module on a float32 tensor of the inputs, with ``params``
    as keyword arguments. An HF checkpoint takes text instead (see ``HFPyfunc``)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def get_raw_model(self):
        return self.module

    def predict(self, data, params: dict[str, Any] | None = None):
        if hasattr(data, "to_numpy"):
            data = data.to_numpy()
        with torch.no_grad():
            out = self.module(torch.from_numpy(np.array(data, dtype=np.float32)), **(params or {}))
        return out.detach().cpu().numpy()


class HFPyfunc:
    """An HF checkpoint as pyfunc: text in (a string, a list of strings, a one-column
    DataFrame), one embedding per text out. A sentence-transformers folder (``modules.json``)
    encodes as ``SentenceTransformer.encode`` does (its pooling and normalization); any other
    folder gives the attention-masked mean of the last hidden state. Token ids (rows of ints,
    ragged rows padded) are accepted too, their padding masked out."""

    def __init__(self, module: torch.nn.Module, folder: Path):
        self.module = module
        self.tokenizer = None
        self.encoder = None
        if has_tokenizer(folder):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if (folder / "modules.json").is_file():
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                pass
            else:
                self.encoder = SentenceTransformer(str(folder), device="cpu")
        self.pad_id = getattr(module.config, "pad_token_id", None) or 0

    def get_raw_model(self):
        return self.module

    def predict(self, data, params: dict[str, Any] | None = None):
        texts = _texts_of(data)
        with torch.no_grad():
            if texts is not None:
                if self.encoder is not None:
                    return np.asarray(self.encoder.encode(texts, convert_to_numpy=True))
                if self.tokenizer is None:
                    raise TaskVecError("this HF checkpoint has no tokenizer files: give token ids, not text")
                batch = dict(self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
            else:
                batch = _padded_ids(data, self.pad_id)
            hidden = self.module(**batch, **(params or {})).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return pooled.detach().cpu().numpy()


def _texts_of(data) -> list[str] | None:
    """The texts in ``data``, or None when it holds token ids."""
    if isinstance(data, str):
        return [data]
    if hasattr(data, "columns"):  # a DataFrame: its one column
        if len(data.columns) != 1:
            raise TaskVecError(f"give text as one column, not {len(data.columns)} columns ({', '.join(map(str, data.columns))})")
        data = data.iloc[:, 0].tolist()
    elif hasattr(data, "tolist"):
        data = data.tolist()
    data = list(data)
    if data and all(isinstance(x, str) for x in data):
        return data
    return None


def _padded_ids(data, pad_id: int) -> dict[str, torch.Tensor]:
    rows = [[int(t) for t in (row.tolist() if hasattr(row, "tolist") else row)] for row in data]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = torch.tensor([t != pad_id for t in row], dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask}
