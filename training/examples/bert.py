"""A BERT encoder and its WordPiece tokenizer in plain PyTorch and Python.

Enough of Hugging Face's ``BertModel`` and ``BertTokenizer`` to run a pre-trained checkpoint
such as sentence-transformers' all-MiniLM-L6-v2 without ``transformers`` or ``tokenizers``:
the modules carry Hugging Face's attribute names, so ``state_dict()`` has exactly the keys of
the checkpoint's ``model.safetensors`` and a strict ``load_state_dict`` works. Only what an
encoder needs is here: absolute positions, one segment, GELU, no cross-attention, no cache.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(kw_only=True, slots=True, frozen=True)
class BertConfig:
    """The ``config.json`` fields that shape the encoder (defaults: MiniLM-L6-H384)."""

    vocab_size: int = 30522
    """Rows of the word embedding."""
    hidden_size: int = 384
    """Width of every token representation."""
    num_hidden_layers: int = 6
    """Transformer layers (``encoder.layer.0`` ... ``encoder.layer.N-1``)."""
    num_attention_heads: int = 12
    """Heads per self-attention; must divide ``hidden_size``."""
    intermediate_size: int = 1536
    """Width of the feed-forward block."""
    hidden_act: str = "gelu"
    """Feed-forward activation; only BERT's exact (erf) ``gelu`` is supported."""
    hidden_dropout_prob: float = 0.1
    """Dropout after embeddings, attention output and feed-forward output."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on the attention probabilities."""
    max_position_embeddings: int = 512
    """Longest sequence the position embedding covers."""
    type_vocab_size: int = 2
    """Segment embeddings (only segment 0 is used: single sentences)."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""
    pad_token_id: int = 0
    """Token id of ``[PAD]``; positions holding it are masked out of attention and pooling."""
    initializer_range: float = 0.02
    """Standard deviation of the random initialisation."""

    def __post_init__(self) -> None:
        # Attention splits the hidden width evenly between heads.
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: only 'gelu'")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BertConfig:
        """The config from a parsed Hugging Face ``config.json`` (unknown keys are ignored)."""
        if doc.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type {doc.get('model_type')!r} is not 'bert'")
        if doc.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {doc['position_embedding_type']!r} is not supported"
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path) -> BertConfig:
        """The config from a Hugging Face ``config.json`` file."""
        return cls.from_dict(json.loads(Path(path).read_text()))


class BertEmbeddings(nn.Module):
    """Word + position + segment embeddings, then LayerNorm and dropout."""

    position_ids: torch.Tensor

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent because the checkpoint stores it (older transformers saved it).
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(positions))
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the unmasked tokens."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)),
            split(self.key(x)),
            split(self.value(x)),
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return out.transpose(1, 2).reshape(b, n, h)


class BertSelfOutput(nn.Module):
    """Projection of the attention output, residual, LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """``self`` (the attention proper) and ``output`` (projection and residual)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    """The widening half of the feed-forward block."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    """The narrowing half of the feed-forward block, residual, LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer layer."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack of layers, ``encoder.layer.N``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class FrozenDense(nn.Module):
    """A dense layer whose weight and bias are buffers: saved and restored, never trained."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_out, n_in))
        self.register_buffer("bias", torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BertPooler(nn.Module):
    """BERT's ``[CLS]`` pooler (dense + tanh), kept so the state dict matches the checkpoint.

    Sentence embeddings use mean pooling instead, so the pooler takes no part in training.
    Its tensors are buffers, not parameters: an unused trainable parameter would make
    DistributedDataParallel fail on the second step.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = FrozenDense(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings, encoder and pooler under Hugging Face's names; randomly initialised.

    Inputs are right-padded token ids; ``[PAD]`` positions are masked out. Trailing columns
    that are padding in every row are dropped first, so a batch costs what its longest
    sentence costs whatever length the dataset was padded to.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # Hugging Face's BertPreTrainedModel._init_weights.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, FrozenDense)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``True`` where ``input_ids`` holds a real token."""
        return input_ids != self.config.pad_token_id

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token hidden states ``[batch, tokens, hidden]`` (padding columns trimmed)."""
        input_ids = trim_padding(input_ids, self.config.pad_token_id)
        mask = self.attention_mask(input_ids)
        return self.encoder(self.embeddings(input_ids), mask[:, None, None, :])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings: the mean of the unmasked tokens' states, L2-normalised.

        This is sentence-transformers' ``Pooling(mean)`` + ``Normalize`` for all-MiniLM-L6-v2.
        """
        input_ids = trim_padding(input_ids, self.config.pad_token_id)
        hidden = self.hidden_states(input_ids)
        return F.normalize(mean_pool(hidden, self.attention_mask(input_ids)), dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (see :meth:`embed`); subclasses put a head on them."""
        return self.embed(input_ids)


def trim_padding(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row (right-padded input)."""
    real = (input_ids != pad_token_id).any(dim=0).nonzero()
    length = int(real.max()) + 1 if len(real) else 1
    return input_ids[:, :length]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` over the positions where ``mask`` is true."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


# --- Tokenizer --------------------------------------------------------------------------


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    # BERT treats every non-alphanumeric ASCII symbol as punctuation, e.g. "$" and "^".
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


class WordPieceTokenizer:
    """BERT's tokenizer: normalise, split on whitespace and punctuation, then WordPiece.

    Follows the ``BertNormalizer`` / ``BertPreTokenizer`` / ``WordPiece`` pipeline of a
    Hugging Face ``tokenizer.json``: drop control characters, map whitespace to spaces,
    isolate CJK characters, strip accents and lowercase (uncased models), split off every
    punctuation character, then greedy longest-match-first subwords with ``##``
    continuations; a word that cannot be covered, or is longer than 100 characters, is
    ``[UNK]``. Sequences are ``[CLS] ... [SEP]``, truncated to ``max_length``.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        max_length: int = 128,
        max_input_chars_per_word: int = 100,
    ) -> None:
        self.vocab = {token: i for i, token in enumerate(vocab)}
        self.tokens = list(vocab)
        self.lowercase = lowercase
        # Hugging Face: strip_accents=None means "whatever lowercase says".
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.max_length = max_length
        self.max_input_chars_per_word = max_input_chars_per_word
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_length: int = 128) -> WordPieceTokenizer:
        """The tokenizer of a Hugging Face folder (``vocab.txt``, ``tokenizer_config.json``)."""
        folder = Path(folder)
        vocab = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
        options: dict[str, Any] = {}
        config = folder / "tokenizer_config.json"
        if config.is_file():
            options = json.loads(config.read_text())
        return cls(
            vocab,
            lowercase=bool(options.get("do_lower_case", True)),
            strip_accents=options.get("strip_accents"),
            max_length=max_length,
        )

    def normalize(self, text: str) -> str:
        """Clean, isolate CJK characters, strip accents, lowercase (``BertNormalizer``)."""
        out = []
        for ch in text:
            if ch in "\0\ufffd" or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(ch):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(
                c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn"
            )
        return text.lower() if self.lowercase else text

    def words(self, text: str) -> list[str]:
        """Whitespace- and punctuation-separated words of normalised ``text``."""
        words: list[str] = []
        for chunk in self.normalize(text).split():
            current = ""
            for ch in chunk:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first subwords of one word, or ``["[UNK]"]``."""
        if len(word) > self.max_input_chars_per_word:
            return ["[UNK]"]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Subword tokens of ``text`` without special tokens."""
        return [piece for word in self.words(text) for piece in self.wordpiece(word)]

    def encode(self, text: str) -> list[int]:
        """``[CLS] tokens [SEP]`` ids, truncated to ``max_length``."""
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)]
        return [self.cls_id, *ids[: self.max_length - 2], self.sep_id]

    def __call__(self, texts: Iterable[str]) -> torch.Tensor:
        """A ``[len(texts), longest]`` int64 batch, right-padded with ``[PAD]``."""
        encoded = [self.encode(t) for t in texts]
        longest = max((len(e) for e in encoded), default=2)
        batch = torch.full((len(encoded), longest), self.pad_id, dtype=torch.int64)
        for row, ids in enumerate(encoded):
            batch[row, : len(ids)] = torch.tensor(ids)
        return batch

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The tokens of ``ids`` (for inspection)."""
        return [self.tokens[i] for i in ids]
