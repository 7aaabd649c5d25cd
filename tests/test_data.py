import json

import pytest

from adapters.config import RunConfig
from adapters.errors import DataError
from train.data import bucketed_batches, load_dataset


def test_banking77_is_complete():
    d = load_dataset(RunConfig())
    assert (len(d.train.texts), len(d.dev.texts), len(d.test.texts)) == (9003, 1000, 3080)
    assert len(d.label_names) == 77


def _write(path, rows, sep=","):
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    return path


@pytest.fixture
def user_files(tmp_path):
    rows = [("text", "intent")] + [(f"sentence number {i}", "a" if i % 2 else "b") for i in range(40)]
    csv = _write(tmp_path / "train.csv", rows)
    tsv = _write(tmp_path / "train.tsv", rows, "\t")
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "intent": y}) for t, y in rows[1:]))
    return csv, tsv, jsonl


def test_user_files_in_three_formats(user_files):
    for f in user_files:
        d = load_dataset(RunConfig(data=str(f), label_column="intent"))
        assert d.label_names == ["a", "b"]
        assert len(d.train.texts) + len(d.dev.texts) + len(d.test.texts) == 40
        assert not set(d.train.texts) & set(d.test.texts)


def test_missing_label_column_is_named(user_files):
    with pytest.raises(DataError, match=r"has no column 'label' \(columns: intent, text\)"):
        load_dataset(RunConfig(data=str(user_files[0])))


def test_empty_file(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_dataset(RunConfig(data=str(tmp_path / "e.csv")))


def test_unreadable_files(tmp_path):
    (tmp_path / "bin.csv").write_bytes(b"text,label\n\xff\xfe\x00bad,x\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(RunConfig(data=str(tmp_path / "bin.csv")))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_dataset(RunConfig(data=str(tmp_path / "bad.jsonl")))
    (tmp_path / "list.jsonl").write_text('{"text": "a", "label": "x"}\n["a", "x"]\n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        load_dataset(RunConfig(data=str(tmp_path / "list.jsonl")))
    with pytest.raises(DataError, match="neither a builtin dataset"):
        load_dataset(RunConfig(data=str(tmp_path / "nope.csv")))


def test_label_in_test_not_in_train(tmp_path):
    train = _write(tmp_path / "train.csv", [("text", "label"), ("x", "a"), ("y", "b"), ("z", "a")])
    test = _write(tmp_path / "test.csv", [("text", "label"), ("w", "c")])
    with pytest.raises(DataError, match="label\\(s\\) in the test data never occur in train, e.g. 'c'"):
        load_dataset(RunConfig(data=str(train), test_data=str(test), dev_data=str(train)))


def test_bucketed_batches_cover_everything_once():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = bucketed_batches(lengths, 32, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    # length-bucketed: the mean spread inside a batch is far below that of a random batch
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15
    assert bucketed_batches(lengths, 32, seed=1) == batches != bucketed_batches(lengths, 32, seed=2)
