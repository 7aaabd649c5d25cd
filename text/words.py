"""Words and word pieces, in numpy only: what the server and training both need on the text side."""

from __future__ import annotations

import numpy as np


def pad(rows: list[list[int]], value: int = 0) -> np.ndarray:
    """Rows of ints as one (len(rows), longest) int64 array, padded with ``value``."""
    out = np.full((len(rows), max(1, max(len(r) for r in rows))), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


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


def word_index(positions: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(word_index, word_mask), each (B, W) int64 padded with 0: the first-piece position of each word of each row."""
    return pad(positions), pad([[1] * len(p) for p in positions])
