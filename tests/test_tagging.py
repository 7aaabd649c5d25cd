"""Sequence labelling: CRF (against brute force), entity metrics, CoNLL data, every method trained and exported with the
Viterbi decode in the graph, PEFT interchange for TOKEN_CLS adapters, and the tagger at serve time."""

import copy
import itertools
import json
import math

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType

from adapters.config import load_config
from adapters.crf import CRF
from adapters.eager import load_adapter_model
from adapters.errors import ConfigError, DataError, ParityError
from export.parity import fp32_bound
from tests.helpers import (
    SMALL,
    TAGGING,
    assert_fp32_equivalent,
    minilm_path,
    peft_model,
    random_peft_adapter,
    request,
    serving,
    train_small,
)
from text.words import spans, viterbi
from train.tagging import WNUT16_SPLIT_SEED, entity_metrics, load_tagging_dataset, read_conll


def _path_score(crf: CRF, e: torch.Tensor, path: list[int]) -> torch.Tensor:
    s = crf.start[path[0]] + e[0, path[0]] + crf.end[path[-1]]
    return s + sum(crf.transitions[a, b] + e[i + 1, b] for i, (a, b) in enumerate(itertools.pairwise(path)))


@pytest.mark.parametrize("seed", range(4))
def test_viterbi_and_nll_equal_brute_force(seed):
    torch.manual_seed(seed)
    t = 3
    crf = CRF(t)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    lengths = [5, 3, 1, 4]
    e = torch.randn(len(lengths), 5, t)
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    tags = torch.randint(0, t, (len(lengths), 5))
    decoded = crf.decode(e, mask)
    nlls, nlls64 = [], []
    crf64 = copy.deepcopy(crf).double()
    for b, n in enumerate(lengths):
        paths = list(itertools.product(range(t), repeat=n))
        scores = torch.stack([_path_score(crf, e[b], list(p)) for p in paths])
        scores64 = torch.stack([_path_score(crf64, e[b].double(), list(p)) for p in paths])
        assert decoded[b, :n].tolist() == list(paths[int(scores.argmax())])
        assert (decoded[b, n:] == -1).all()
        assert viterbi(
            e[b].double().numpy(), n, *(x.detach().double().numpy() for x in (crf.start, crf.end, crf.transitions))
        ) == list(paths[int(scores.argmax())])  # the server's numpy decode too
        nlls.append(torch.logsumexp(scores, 0) - _path_score(crf, e[b], tags[b, :n].tolist()))
        nlls64.append(torch.logsumexp(scores64, 0) - _path_score(crf64, e[b].double(), tags[b, :n].tolist()))
    # the forward algorithm against the sum over every path, each as close to that sum in float64 as fp32 gets
    assert_fp32_equivalent(crf.nll(e, tags, mask), torch.stack(nlls).mean(), torch.stack(nlls64).mean(), "CRF NLL")


def test_entity_spans_follow_seqeval_rules():
    assert spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert spans(["I-PER", "I-PER", "O"]) == {("PER", 0, 1)}  # I- after O starts a span (conlleval)
    assert spans(["B-PER", "I-LOC", "B-PER", "B-PER"]) == {("PER", 0, 0), ("LOC", 1, 1), ("PER", 2, 2), ("PER", 3, 3)}
    m = entity_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "O", "O", "B-LOC"]])
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and math.isclose(m["f1"], 0.5) and m["token_accuracy"] == 0.75


def test_conll_reader_and_fixed_wnut16_split(tmp_path):
    f = tmp_path / "a.conll"
    f.write_text("EU\tB-ORG\nrejects\tO\n\n\nPeter x B-PER\n")  # any first/last column, blank lines between sentences
    split = read_conll(f)
    assert split.tokens == [["EU", "rejects"], ["Peter"]] and split.tags == [["B-ORG", "O"], ["B-PER"]]
    f.write_text("EU\n")
    with pytest.raises(DataError, match="line 1 is not 'token<TAB>tag'"):
        read_conll(f)
    a = load_tagging_dataset(load_config(None, ["task=tagging", "data=wnut16"]))
    b = load_tagging_dataset(load_config(None, ["task=tagging", "data=wnut16", "seed=7"]))
    assert (len(a.train.tokens), len(a.dev.tokens), len(a.test.tokens)) == (1915, 239, 240)
    assert a.dev.tokens == b.dev.tokens and a.test.tokens[:5] == b.test.tokens[:5]  # independent of the run seed
    from train.tagging import builtin_path

    whole = read_conll(builtin_path("wnut16")).tokens  # the three splits partition the 2,394 tweets
    assert sorted(map(tuple, a.train.tokens + a.dev.tokens + a.test.tokens)) == sorted(map(tuple, whole))
    assert "O" in a.label_names and len(a.label_names) == 21 and WNUT16_SPLIT_SEED == 13


def test_bad_tagging_choices_fail_at_start(tmp_path):
    with pytest.raises(ConfigError, match="head=crf needs task=tagging"):
        load_config(None, ["head=crf"])
    with pytest.raises(ConfigError, match="head=crf trains on the CRF likelihood"):
        load_config(None, ["task=tagging", "head=crf", "label_smoothing=0.1"])
    train = tmp_path / "t.conll"
    train.write_text("a\tO\nb\tB-X\n\n" * 20)
    dev = tmp_path / "d.conll"
    dev.write_text("a\tB-NEW\n")
    with pytest.raises(DataError, match="never occur in train, e.g. 'B-NEW'"):
        load_tagging_dataset(load_config(None, ["task=tagging", f"data={train}", f"dev_data={dev}", f"test_data={dev}"]))


@pytest.mark.parametrize("method", ["p_tuning_v2", "lora", "prompt_tuning", "p_tuning", "full", "head"])
def test_every_method_tags_and_exports_with_viterbi_in_the_graph(tmp_path, tiny_bert, method):
    from export.run import export_run

    crf = ["head=crf", "label_smoothing=0"]  # the default config smooths labels without bf16: a cross-entropy option
    run = train_small(tmp_path / "run", method, str(tiny_bert), [*TAGGING, *crf, "head_lr=5e-2"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "tagging" and 0 <= metrics["test_entity_f1"] <= 1 and metrics["test_accuracy"] > 0
    assert (run / "adapter" / "crf.safetensors").is_file()
    m = export_run(run)
    p = m["parity"]
    assert m["task"] == "token-classification" and m["outputs"] == ["emissions", "tags"] and m["int8"] is None
    assert p["max_abs_diff"] <= p["tolerance"] and p["paths_agree"] == 1.0 and p["n_samples"] == 40
    assert p["max_abs_error"] <= fp32_bound(p["reference_error"], p["scale"])  # onnxruntime as accurate as eager fp32
    # the eager model's emissions cover the real tokens only (prompt methods drop their virtual positions)
    model = load_adapter_model(run / "adapter", str(tiny_bert))
    with torch.inference_mode():
        assert model(torch.ones((2, 7), dtype=torch.long), torch.ones((2, 7), dtype=torch.long)).shape[:2] == (2, 7)


@pytest.fixture(scope="module")
def minilm_tagger(tmp_path_factory):
    from export.run import export_run
    from train.run import run

    d = tmp_path_factory.mktemp("minilm_tagger")
    run(d, None, ["method=p_tuning_v2", "lr=2e-2", "head=crf", "head_lr=5e-2", *SMALL[2:], *TAGGING])
    export_run(d)
    return d


def test_minilm_tagger_serves_the_graph_decode_and_the_emissions_only_decode(minilm_tagger, tmp_path):
    import shutil

    from export.run import export_run
    from serve.repository import load_model
    from serve.tags import Tagger

    texts = ["Watching the Empire State Building from New York with Justin Bieber", "ok", "I love @user on Netflix tonight"]
    tagger = load_model(minilm_tagger / "export")
    assert isinstance(tagger, Tagger) and tagger.output == "tags"
    out = tagger.predict(texts)
    assert [len(o["tags"]) for o in out] == [len(t.split()) for t in texts]
    assert all(tag in tagger.labels for o in out for tag in o["tags"])
    copy = tmp_path / "run"
    shutil.copytree(minilm_tagger, copy, ignore=shutil.ignore_patterns("export"))
    m = export_run(copy, decode=False)
    assert m["outputs"] == ["emissions"] and (copy / "export" / "crf.json").is_file() and m["parity"]["paths_agree"] == 1.0
    emissions_only = load_model(copy / "export")
    assert emissions_only.output == "emissions" and emissions_only.crf is not None
    assert emissions_only.predict(texts) == out  # numpy Viterbi at serve == Viterbi in the graph


def test_tagging_parity_gate_catches_a_wrong_decode(minilm_tagger):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from export.parity import check_tagging_parity
    from train.splits import dev_split

    eager = load_adapter_model(minilm_tagger / "adapter")
    session = ort.InferenceSession(str(minilm_tagger / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    sentences = list(dev_split(minilm_tagger).tokens)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    bare = load_adapter_model(minilm_tagger / "adapter")
    bare.prefix = None
    assert check_tagging_parity(session, eager, bare, tok, sentences, 32).paths_agree == 1.0
    with torch.no_grad():
        eager.crf.transitions.add_(torch.randn_like(eager.crf.transitions) * 5)  # the graph's CRF is now another one
    with pytest.raises(ParityError, match="decoded tags differ"):
        check_tagging_parity(session, eager, bare, tok, sentences, 32)


def test_serve_alignment_equals_training_alignment(minilm_tagger):
    """The server (tokenizers, no transformers) must pick the same first word pieces as training did."""
    from transformers import AutoTokenizer

    from serve.repository import load_model
    from text.words import first_pieces

    words = [["@paulwalk", "It's", "the", "view", "Empire", "State", "Building", "=", "ESB", "😀", "naïve"], ["x"]]
    tagger = load_model(minilm_tagger / "export")
    feeds, kept = tagger.encode_words(words)
    enc = AutoTokenizer.from_pretrained(minilm_path())(words, is_split_into_words=True, truncation=True, max_length=64)
    for i in range(len(words)):
        pos, ws = first_pieces(enc.word_ids(i))
        assert feeds["word_index"][i, : len(pos)].tolist() == pos and kept[i] == ws
        assert feeds["input_ids"][i, : len(enc["input_ids"][i])].tolist() == enc["input_ids"][i]


@pytest.mark.parametrize(
    "config",
    [
        PrefixTuningConfig(task_type=TaskType.TOKEN_CLS, num_virtual_tokens=5),
        LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, lora_alpha=8, target_modules=["query", "value"]),
    ],
    ids=["prefix", "lora"],
)
def test_token_cls_adapters_interchange_with_peft(tmp_path, tiny_bert, config):
    from tests.helpers import padded_batch

    ids, mask = padded_batch(tiny_bert)
    adapter = random_peft_adapter(tiny_bert, config, tmp_path / "peft")
    with torch.inference_mode():
        peft = peft_model(adapter, tiny_bert, 5, "tagging")
        theirs = peft(input_ids=ids, attention_mask=mask).logits
        exact = peft.double()(input_ids=ids, attention_mask=mask).logits
        ours = load_adapter_model(adapter, str(tiny_bert))(ids, mask)
    keep = mask.bool()
    assert_fp32_equivalent(ours[keep], theirs[keep], exact[keep], "PEFT-written tagger")
    # and ours -> PEFT: a tagging run's adapter loads in PEFT with the same emissions
    method = "lora" if isinstance(config, LoraConfig) else "p_tuning_v2"
    run = train_small(tmp_path / "run", method, str(tiny_bert), TAGGING)
    labels = json.loads((run / "adapter" / "labels.json").read_text())
    with torch.inference_mode():
        peft = peft_model(run / "adapter", tiny_bert, len(labels), "tagging")
        theirs = peft(input_ids=ids, attention_mask=mask).logits
        exact = peft.double()(input_ids=ids, attention_mask=mask).logits
        ours = load_adapter_model(run / "adapter", str(tiny_bert))(ids, mask)
    assert_fp32_equivalent(ours[keep], theirs[keep], exact[keep], "our tagger in PEFT")


def test_tagger_over_http(minilm_tagger):
    """The real server process on a tagging export: words, tags and entities back; a text with no words is a 422."""
    with serving(minilm_tagger / "export") as base:
        status, ready = request(base + "/ready")
        assert status == 200 and ready["task"] == "token-classification"
        status, body = request(base + "/predict", json.dumps({"texts": ["Justin Bieber in New York", "ok"]}).encode())
        assert status == 200
        first = body["predictions"][0]
        assert first["words"] == ["Justin", "Bieber", "in", "New", "York"] and len(first["tags"]) == 5
        assert all({"type", "text", "start_word", "end_word"} <= set(e) for e in first["entities"])
        status, body = request(base + "/predict", json.dumps({"texts": ["   "]}).encode())
        assert status == 422 and body == {"error": "texts[0] has no words", "error_type": "validation"}
