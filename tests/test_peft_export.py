"""`make export` of adapters written by the peft library itself: the graph gives PEFT's own eager logits."""

import json

import onnxruntime as ort
import pytest
import torch

from export.__main__ import main
from tests.helpers import PEFT_CONFIGS, PEFT_IDS, assert_fp32_equivalent, padded_batch, peft_model, random_peft_adapter

HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # not available offline: the base must be given explicitly


@pytest.mark.parametrize("config", PEFT_CONFIGS, ids=PEFT_IDS)
def test_peft_written_adapter_exports_with_peft_logits(tmp_path, tiny_bert, config, capsys):
    adapter = random_peft_adapter(tiny_bert, config, tmp_path / "peft_adapter")
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": HUB_NAME}))
    out = tmp_path / "out"
    # a hub name that is not here: one clear line, nothing written
    assert main(["--adapter", str(adapter), "--run", str(out), "--data", "banking77", "--no-int8"]) == 2
    assert "pass --base-model" in capsys.readouterr().err and not (out / "export").exists()
    args = ["--adapter", str(adapter), "--run", str(out), "--data", "banking77", "--base-model", str(tiny_bert), "--no-int8"]
    assert main(args) == 0, capsys.readouterr().err
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= manifest["parity"]["tolerance"]
    ids, mask = padded_batch(tiny_bert)
    with torch.inference_mode():
        peft = peft_model(adapter, tiny_bert, 5)
        theirs = peft(input_ids=ids, attention_mask=mask).logits.numpy()
        exact = peft.double()(input_ids=ids, attention_mask=mask).logits.numpy()
    session = ort.InferenceSession(str(out / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert_fp32_equivalent(ours, theirs, exact, "the export against PEFT's logits")
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
