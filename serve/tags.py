"""Sequence labelling at serve time (numpy only): word alignment, BIO entity spans, Viterbi, and the Tagger.

Texts are split into words on whitespace (as in CoNLL training files), each word is labelled on its first word piece,
and words cut off by ``max_length`` come back tagged ``O``. The exported graph takes ``word_index`` / ``word_mask``
(B, W) beside the token inputs and returns ``tags`` (B, W) decoded in the graph (CRF Viterbi or argmax); a graph
exported with ``--emissions-only`` returns only ``emissions`` (B, W, T), decoded here with the CRF in crf.json.
"""

from __future__ import annotations

import json

import numpy as np

from serve.runtime import Classifier, ServeError


def first_pieces(word_ids: list[int | None]) -> tuple[list[int], list[int]]:
    """(positions, words): the first word piece of each word in a tokenizer's ``word_ids`` list."""
    positions, words, prev = [], [], None
    for pos, w in enumerate(word_ids):
        if w is not None and w != prev:
            positions.append(pos)
            words.append(w)
        prev = w
    return positions, words


def spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entity spans (type, first, last) of a BIO/IOB2 tag sequence, seqeval's default (conlleval) rules: a span starts
    at B-X, or at I-X not continuing an X span, and ends before O, B-*, or a tag of another type."""
    out, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        continues = prefix == "I" and kind == typ
        if start is not None and not continues:
            out.add((kind, start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, typ
    return out


def viterbi(emissions: np.ndarray, n: int, start: np.ndarray, end: np.ndarray, transitions: np.ndarray) -> list[int]:
    """Best path over the first ``n`` rows of emissions (W, T) under a CRF (transitions [from, to])."""
    if n == 0:
        return []
    score = start + emissions[0]
    back = []
    for i in range(1, n):
        step = score[:, None] + transitions + emissions[i][None, :]
        back.append(step.argmax(0))
        score = step.max(0)
    path = [int((score + end).argmax())]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    return path[::-1]


class Tagger(Classifier):
    """An exported token classifier. ``predict(texts)`` -> per text: words, tags and entity spans."""

    def __init__(self, export_dir, **kw) -> None:
        super().__init__(export_dir, **kw)
        outputs = [o.name for o in self.session.get_outputs()]
        self.crf = None
        if "tags" not in outputs:  # emissions-only graph: decode here
            path = self.export_dir / "crf.json"
            if path.is_file():
                self.crf = {k: np.asarray(v, dtype=np.float64) for k, v in json.loads(path.read_text()).items()}
        self.output = "tags" if "tags" in outputs else "emissions"
        self.inputs = {i.name for i in self.session.get_inputs()}  # an emissions-only graph has no word_mask

    def encode_words(self, words: list[list[str]]) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        """Graph inputs for pre-split sentences, and which word each kept position is."""
        enc = self.tokenizer.encode_batch(words, is_pretokenized=True)
        aligned = [first_pieces(e.word_ids) for e in enc]
        width = max(1, max(len(p) for p, _ in aligned))
        word_index = np.zeros((len(enc), width), dtype=np.int64)
        word_mask = np.zeros((len(enc), width), dtype=np.int64)
        for i, (pos, _) in enumerate(aligned):
            word_index[i, : len(pos)] = pos
            word_mask[i, : len(pos)] = 1
        feeds = {
            "input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
            "word_index": word_index,
            "word_mask": word_mask,
        }
        return feeds, [w for _, w in aligned]

    def tag_words(self, words: list[list[str]]) -> list[list[str]]:
        """A tag for every word of every sentence."""
        if any(not sent for sent in words):
            raise ServeError("a sentence has no words")
        feeds, kept = self.encode_words(words)
        out = self.session.run([self.output], {k: v for k, v in feeds.items() if k in self.inputs})[0]
        result = []
        for row, (sent, ws) in enumerate(zip(words, kept, strict=True)):
            if self.output == "tags":
                ids = out[row, : len(ws)].tolist()
            elif self.crf is not None:
                ids = viterbi(out[row].astype(np.float64), len(ws), self.crf["start"], self.crf["end"], self.crf["transitions"])
            else:
                ids = out[row, : len(ws)].argmax(-1).tolist()
            tags = ["O"] * len(sent)
            for w, t in zip(ws, ids, strict=True):
                tags[w] = self.labels[t]
            result.append(tags)
        return result

    def predict(self, texts: list[str], top_k: int = 1) -> list[dict]:
        words = [t.split() for t in texts]
        out = []
        for sent, tags in zip(words, self.tag_words(words), strict=True):
            entities = [
                {"type": typ, "text": " ".join(sent[a : b + 1]), "start_word": a, "end_word": b}
                for typ, a, b in sorted(spans(tags), key=lambda s: s[1])
            ]
            out.append({"words": sent, "tags": tags, "entities": entities})
        return out
