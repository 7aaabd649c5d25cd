"""A bank served by the real server process: every adapter by name, adapters mixed in one batch, adapters added,
replaced and removed while requests run, and the change kept across a restart; with the real tritonclient too.

The adapters are written by the peft library (random tensors, label sets of different sizes) on the tiny BERT; each
answer is checked against that adapter's own single-adapter export, run here in onnxruntime.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
from peft import PrefixTuningConfig, TaskType
from tokenizers import Tokenizer

from export.bank import export_bank
from export.run import export_run
from serve.tags import Tagger
from tests.helpers import random_peft_adapter, request, serving, tagging_adapters

P = 5
TEXTS = ["book me a flight to paris", "what is my card balance", "play something by miles davis", "hi"]


def _adapter(root, tiny_bert, name, labels, seed, virtual=P):
    folder = root / name / "adapter"
    random_peft_adapter(tiny_bert, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=virtual), folder,
                        num_labels=labels, seed=seed)  # fmt: skip
    (folder / "labels.json").write_text(json.dumps([f"{name}-{k}" for k in range(labels)]))
    export_run(folder.parent, str(tiny_bert), int8=False, adapter_dir=folder, data="banking77", fp16=False, triton=False)
    return folder


def _own_logits(folder, texts):
    """The adapter's own export (RUN/export/model.onnx), each text alone."""
    export = folder.parent / "export"
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    tok.no_padding()  # each text alone, unpadded
    out = []
    for text in texts:
        ids = np.asarray([tok.encode(text).ids], np.int64)
        out.append(session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0])
    return np.stack(out)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("served_bank")
    made = {name: _adapter(root, tiny_bert, name, labels, seed) for name, labels, seed in
            (("a", 3, 0), ("b", 6, 1), ("c", 4, 2), ("d", 9, 3))}  # fmt: skip
    made["short"] = _adapter(root, tiny_bert, "short", 3, 4, virtual=P - 2)
    models = root / "models"
    export_bank(models / "bank", [str(made["a"]), str(made["b"]), str(made["c"])], str(tiny_bert))
    return models, made


def post(url, body):
    return request(url, json.dumps(body).encode())


def _logits(base, name, texts):
    """The v2 protocol's logits for ``texts`` on model ``name`` (JSON tensors)."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    status, out = post(f"{base}/v2/models/{name}/infer", body)
    assert status == 200, out
    return np.asarray(next(o for o in out["outputs"] if o["name"] == "logits")["data"], np.float32).reshape(len(texts), -1)


def test_each_adapter_answers_as_its_own_export(adapters):
    models, made = adapters
    with serving(models=models) as (base, _):
        status, out = post(base + "/predict", {"texts": TEXTS, "model": "bank/b"})
        assert status == 200, out
        labels = json.loads((made["b"] / "labels.json").read_text())
        assert {p["label"] for p in out["predictions"]} <= set(labels)
        for name in ("a", "b", "c"):
            np.testing.assert_allclose(_logits(base, f"bank/{name}", TEXTS), _own_logits(made[name], TEXTS), atol=1e-4)
        status, out = post(base + "/predict", {"texts": TEXTS, "model": "bank"})
        assert status == 422 and "bank of adapters" in out["error"], out
        status, out = post(base + "/predict", {"texts": TEXTS, "model": "bank/zzz"})
        assert status == 404 and "no adapter 'zzz'" in out["error"], out
        status, index = post(base + "/v2/repository/index", {})
        assert {"bank/a", "bank/b", "bank/c"} <= {m["name"] for m in index}
        status, meta = request(base + "/v2/models/bank/c")
        assert status == 200 and meta["parameters"]["labels"] == json.loads((made["c"] / "labels.json").read_text())


def test_concurrent_requests_mix_adapters_in_batches(adapters):
    """Many clients at once, each on its own adapter: batches mix adapters, and every answer is its adapter's."""
    models, made = adapters
    want = {n: _own_logits(made[n], TEXTS) for n in ("a", "b", "c")}
    errors = []
    with serving(models=models) as (base, _):

        def client(name):
            for _ in range(6):
                try:
                    np.testing.assert_allclose(_logits(base, f"bank/{name}", TEXTS), want[name], atol=1e-4)
                except Exception as e:  # noqa: BLE001 - collected for the main thread
                    errors.append(e)

        threads = [threading.Thread(target=client, args=(n,)) for n in ("a", "b", "c") * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with urllib.request.urlopen(base + "/metrics") as r:
            text = r.read().decode()
    assert not errors, errors[:2]
    runs = float(re.search(r'^edgetune_batch_size_count\{model="bank"\} (\S+)', text, re.M).group(1))
    rows = float(re.search(r'^edgetune_batch_size_sum\{model="bank"\} (\S+)', text, re.M).group(1))
    assert rows == 12 * 6 * len(TEXTS) and rows / runs > len(TEXTS)  # runs held the rows of several requests


def test_adapters_are_added_replaced_and_removed_while_serving(adapters, tmp_path):
    """Add from a folder and by upload, replace, remove: no request in flight fails, each change shows at once, a
    misfit adapter is refused by name, and a restarted server serves the bank as changed."""
    models, made = adapters
    repo = tmp_path / "models"
    shutil.copytree(models, repo)
    want = {n: _own_logits(made[n], TEXTS) for n in ("a", "b", "c", "d")}
    failures, answered, stop = [], [], threading.Event()
    with serving(models=repo) as (base, _):

        def load():  # requests on adapter a all through the changes
            while not stop.is_set():
                status, out = post(base + "/predict", {"texts": TEXTS, "model": "bank/a"})
                (answered if status == 200 else failures).append(out)

        runner = threading.Thread(target=load)
        runner.start()
        try:
            status, out = post(base + "/v2/repository/models/bank/load", {"parameters": {"adapter": "d", "path": str(made["d"])}})
            assert status == 200 and out == {"adapter": "d", "labels": 9, "adapters": 4}, out
            np.testing.assert_allclose(_logits(base, "bank/d", TEXTS), want["d"], atol=1e-4)

            upload = ("adapter_config.json", "adapter_model.safetensors", "labels.json")
            files = {f: base64.b64encode((made["c"] / f).read_bytes()).decode() for f in upload}
            status, out = post(base + "/v2/repository/models/bank/load", {"parameters": {"adapter": "a", "files": files}})
            assert status == 200 and out["adapters"] == 4, out  # a replaced by c's weights and labels
            np.testing.assert_allclose(_logits(base, "bank/a", TEXTS), want["c"], atol=1e-4)

            status, out = post(
                base + "/v2/repository/models/bank/load", {"parameters": {"adapter": "e", "path": str(made["short"])}}
            )
            assert status == 422 and "3 virtual tokens; every adapter of this bank has 5" in out["error"], out

            status, out = post(base + "/v2/repository/models/bank/unload", {"parameters": {"adapter": "b"}})
            assert status == 200 and out == {"adapters": 3}, out
            assert post(base + "/predict", {"texts": TEXTS, "model": "bank/b"})[0] == 404
        finally:
            stop.set()
            runner.join()
    assert answered and not failures, failures[:2]
    with serving(models=repo) as (base, _):  # the changes were written to the bank folder
        np.testing.assert_allclose(_logits(base, "bank/d", TEXTS), want["d"], atol=1e-4)
        np.testing.assert_allclose(_logits(base, "bank/a", TEXTS), want["c"], atol=1e-4)
        assert post(base + "/predict", {"texts": TEXTS, "model": "bank/b"})[0] == 404


def test_tritonclient_names_a_bank_adapter(adapters):
    import tritonclient.http as triton

    models, made = adapters
    with serving(models=models) as (base, _):
        client = triton.InferenceServerClient(url=base.removeprefix("http://"))
        assert client.is_model_ready("bank/b")
        text = triton.InferInput("text", [len(TEXTS)], "BYTES")
        text.set_data_from_numpy(np.array(TEXTS, dtype=object))
        logits = client.infer("bank/b", [text]).as_numpy("logits")
        np.testing.assert_allclose(logits, _own_logits(made["b"], TEXTS), atol=1e-4)


def test_bankload_measures_a_bank_against_separate_exports(exported, tiny_bert, tmp_path):
    """bench.bankload end to end on a tiny run: the served bank equals the adapter's own export, and every size has
    its memory and throughput figures."""
    from bench.bankload import bankload, tables
    from bench.loadtest import Settings

    run = exported("tiny", "p_tuning_v2")
    export_bank(tmp_path / "bank", [str(run / "adapter")], str(tiny_bert))
    settings = Settings(duration_s=1.0, warmup_s=0.2, texts=32, drain_s=5.0)
    result = bankload(tmp_path / "bank", run / "export", run, (1, 3), (1, 2), settings)
    assert result["served_parity"]["rows"] == 32 and result["served_parity"]["max_abs_diff"] <= 1e-4
    assert [r["adapters"] for r in result["bank_rows"]] == [1, 3] and [r["exports"] for r in result["separate_rows"]] == [1, 2]
    assert all(r["texts_per_s"] > 0 and set(r["each_round"][0]["status"]) == {"200"} for r in result["bank_rows"])
    assert result["separate_rows"][1]["rss_mb"] > result["separate_rows"][0]["rss_mb"]
    assert len(tables(result)) == 2 + 2 + 3 + 2


TWEETS = ["Going to see the Lakers in Los Angeles with John tonight", "new iPhone from Apple is out", "hi",
          "@user watching Game of Thrones on HBO , so good"]  # fmt: skip


def test_a_tagging_bank_answers_as_each_adapters_own_export(tmp_path, tiny_bert):
    """A bank of three token classifiers (tag sets of 3, 5 and 7, one with a CRF) served by the real server: each
    adapter's words, tags and entities equal its own single export's (which decodes in its graph), and an adapter
    uploaded with its CRF answers as that CRF's export."""
    folders = tagging_adapters(tmp_path, tiny_bert)
    own = {}
    for folder in folders:
        export_run(folder.parent, str(tiny_bert), int8=False, adapter_dir=folder, data="wnut16", fp16=False, triton=False)
        own[folder.parent.name] = Tagger(folder.parent / "export", providers="cpu").predict(TWEETS)
    models = tmp_path / "models"
    export_bank(models / "tags", [str(f) for f in folders], str(tiny_bert))
    with serving(models=models) as (base, _):
        for name, want in own.items():
            status, out = post(base + "/predict", {"texts": TWEETS, "model": f"tags/{name}"})
            assert status == 200, out
            assert out["predictions"] == want, name
        assert len({json.dumps(p) for p in own.values()}) == 3  # the adapters tag differently
        files = {f: base64.b64encode((folders[1] / f).read_bytes()).decode()
                 for f in ("adapter_config.json", "adapter_model.safetensors", "labels.json", "crf.safetensors")}  # fmt: skip
        status, out = post(base + "/v2/repository/models/tags/load", {"parameters": {"adapter": "up", "files": files}})
        assert status == 200 and out == {"adapter": "up", "labels": 5, "adapters": 4}, out
        status, out = post(base + "/predict", {"texts": TWEETS, "model": "tags/up"})
        assert status == 200 and out["predictions"] == own["tagger1"], out
