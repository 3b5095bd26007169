"""Run by the client tests in a subprocess, with one transformers version first on the path:
``python minilm_embed.py FOLDER...`` loads each folder with ``AutoModel`` and
``AutoTokenizer.from_pretrained`` (as a user of that version would) and prints, as JSON, the
version and, per folder, its sentence embeddings (mean pooling, L2 norm: all-MiniLM-L6-v2's)
or the first line of the error that refused it."""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "The cat sits outside",
    "A man is playing guitar",
    "I love pasta",
    "The new movie is awesome",
    "The cat plays in the garden",
    "A woman watches TV",
    "The new movie is so great",
    "Do you like pizza?",
]


def embed(folder: str) -> list[list[float]] | str:
    try:
        return _embed(folder)
    except Exception as e:  # reported, not raised: a refusal is a result here
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def _embed(folder: str) -> list[list[float]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).tolist()


torch.set_num_threads(1)
print(
    json.dumps(
        {"version": transformers.__version__, "embeddings": [embed(f) for f in sys.argv[1:]]}
    )
)
