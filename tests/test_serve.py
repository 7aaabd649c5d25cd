"""The server: no torch at serve time, and a real HTTP round trip against the real server process."""

import json
import subprocess
import sys

import pytest
import torch

from export.eager import load_adapter_model
from tests.conftest import ROOT
from tests.helpers import request, serving


def test_serving_never_imports_torch(exported):
    export_dir = exported("tiny", "p_tuning_v2") / "export"
    code = (
        "import sys\n"
        "from serve.runtime import Classifier\n"
        "from serve.app import create_app\n"
        f"c = Classifier({str(export_dir)!r})\n"
        "create_app(c)\n"
        "print(c.classify(['how do I top up my card'])[0]['label'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.fixture
def server(exported):
    run = exported("minilm", "p_tuning_v2")
    with serving(run / "export") as base:
        yield base, run


def test_http_round_trip_matches_eager_model(server):
    from transformers import AutoTokenizer

    base, run = server
    texts = [
        "I still have not received my new card",
        "How do I top up by bank transfer?",
        "Why was I charged a fee?",
        "my card got declined",
        "cancel the transfer please",
    ]
    status, body = request(base + "/predict", json.dumps({"texts": texts, "top_k": 3}).encode())
    assert status == 200
    preds = body["predictions"]
    assert len(preds) == len(texts) and all(len(p["top"]) == 3 for p in preds)
    tok = AutoTokenizer.from_pretrained(run / "export")
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        logits = load_adapter_model(run / "adapter")(enc["input_ids"], enc["attention_mask"])
    labels = json.loads((run / "export" / "labels.json").read_text())
    assert [p["label"] for p in preds] == [labels[i] for i in logits.argmax(-1).tolist()]
    probs = torch.softmax(logits.double(), -1).max(-1).values
    # logits within the export's tolerance d of eager's move a softmax probability p by at most p(e^2d - 1) ~ 2d (+ fp32 rounding)
    tol = json.loads((run / "export" / "manifest.json").read_text())["parity"]["tolerance"]
    assert all(abs(p["score"] - float(q)) <= 2 * tol + 1e-6 for p, q in zip(preds, probs, strict=True))
    status, ready = request(base + "/ready")
    assert status == 200 and ready["method"] == "p_tuning_v2" and ready["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize(
    "body, message",
    [
        (b"not json", "not valid JSON"),
        (b'{"text": "hi"}', '"texts" list'),
        (b'{"texts": []}', "non-empty list"),
        (b'{"texts": ["ok", 3]}', "texts[1] is a int"),
        (b'{"texts": ["ok"], "top_k": 0}', "top_k"),
    ],
)
def test_bad_requests_get_clear_400_and_server_stays_up(server, body, message):
    base, _ = server
    status, reply = request(base + "/predict", body)
    assert status == 400 and message in reply["error"]
    assert request(base + "/health") == (200, {"status": "ok"})
