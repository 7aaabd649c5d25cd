"""bench.bank's customer intent sets, on the real datasets: disjoint chunks of each dataset's intents that cover it,
every row of the dataset's own splits in exactly one set, and TSV files that read back as the rows they were cut from."""

from collections import Counter

from adapters.config import load_config
from bench.bank import GROUPS, chunks, intent_sets, write_set
from train.data import load_dataset, read_rows


def test_chunks_are_contiguous_and_even():
    items = [str(i) for i in range(77)]
    parts = chunks(items, 4)
    assert [len(p) for p in parts] == [20, 19, 19, 19] and sum(parts, []) == items


def test_intent_sets_cut_each_dataset_and_round_trip_through_tsv(tmp_path):
    sets = intent_sets()
    assert len(sets) == sum(GROUPS.values()) >= 10
    assert all(10 <= len(s.labels) <= 40 for s in sets)
    for dataset in GROUPS:
        data = load_dataset(load_config(None, [f"data={dataset}"]))
        mine = [s for s in sets if s.dataset == dataset]
        assert sum((s.labels for s in mine), []) == data.label_names
        for split in ("train", "dev", "test"):
            whole = getattr(data, split)
            assert Counter(t for s in mine for t in s.splits[split].texts) == Counter(whole.texts)
            assert all(set(s.splits[split].labels) <= set(s.labels) for s in mine)
    # BANKING77's train split holds texts with quotes, newlines and surrounding spaces: they come back as they were
    tricky = next(s for s in sets if any("\n" in t for t in s.splits["train"].texts))
    paths = write_set(tmp_path, tricky)
    for split, path in paths.items():
        assert read_rows(path, "text", "label") == tricky.splits[split]
