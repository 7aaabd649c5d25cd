"""Sequence labelling at serve time (numpy only): word alignment, BIO entity spans, Viterbi, and the Tagger.

Texts are split into words on whitespace (as in CoNLL training files), each word is labelled on its first word piece,
and words cut off by ``max_length`` come back tagged ``O``. The exported graph takes ``word_index`` / ``word_mask``
(B, W) beside the token inputs and returns ``tags`` (B, W) decoded in the graph (CRF Viterbi or argmax); a graph
exported with ``--emissions-only`` returns only ``emissions`` (B, W, T), decoded here with the CRF in crf.json.
"""

from __future__ import annotations

import json

import numpy as np

from serve.runtime import Classifier, Row, ServeError, TextTooLong
from text.words import first_pieces, spans, viterbi, word_index


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

    def word_rows(self, words: list[list[str]], truncate: bool = True) -> list[Row]:
        """Pre-split sentences as rows; words cut off by max_length are tagged O (or, ``truncate`` off, refused)."""
        if any(not sent for sent in words):
            raise ServeError(f"texts[{next(i for i, s in enumerate(words) if not s)}] has no words")
        out = []
        for i, e in enumerate(self.tokenizer.encode_batch(words, is_pretokenized=True)):
            if e.overflowing and not truncate:
                full = self.full_tokenizer.encode(words[i], is_pretokenized=True)
                raise TextTooLong(i, len(full.ids), self.max_length)
            positions, kept = first_pieces(e.word_ids)
            out.append(Row(e.ids, bool(e.overflowing), words[i], positions, kept))
        return out

    def rows(self, texts: list[str], truncate: bool = True) -> list[Row]:
        return self.word_rows([t.split() for t in texts], truncate)

    def feeds(self, rows: list[Row]) -> dict[str, np.ndarray]:
        feeds = super().feeds(rows)
        feeds["word_index"], feeds["word_mask"] = word_index([r.positions for r in rows])
        return {k: v for k, v in feeds.items() if k in self.inputs}  # an emissions-only graph has no word_mask

    def run(self, rows: list[Row]) -> list[list[int]]:
        """One session run over rows of any lengths: each row's tag ids, one per kept word."""
        out = self.session_run([self.output], self.feeds(rows))[0]
        ids = []
        for i, row in enumerate(rows):
            n = len(row.kept)
            if self.output == "tags":
                ids.append(out[i, :n].tolist())
            elif self.crf is not None:
                ids.append(viterbi(out[i].astype(np.float64), n, self.crf["start"], self.crf["end"], self.crf["transitions"]))
            else:
                ids.append(out[i, :n].argmax(-1).tolist())
        return ids

    def result(self, row: Row, out: list[int], top_k: int = 1) -> dict:
        tags, labels = ["O"] * len(row.words), self.labels_of(row)
        for w, t in zip(row.kept, out, strict=True):
            tags[w] = labels[t]
        entities = [
            {"type": typ, "text": " ".join(row.words[a : b + 1]), "start_word": a, "end_word": b}
            for typ, a, b in sorted(spans(tags), key=lambda s: s[1])
        ]
        pred = {"words": row.words, "tags": tags, "entities": entities}
        if row.truncated:
            pred["truncated"] = True
        return pred

    def encode_words(self, words: list[list[str]]) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        """Graph inputs for pre-split sentences, and which word each kept position is."""
        rows = self.word_rows(words)
        index, mask = word_index([r.positions for r in rows])
        return Classifier.feeds(self, rows) | {"word_index": index, "word_mask": mask}, [r.kept for r in rows]

    def tag_words(self, words: list[list[str]]) -> list[list[str]]:
        """A tag for every word of every sentence."""
        rows = self.word_rows(words)
        return [self.result(r, o)["tags"] for r, o in zip(rows, self.run(rows), strict=True)]
