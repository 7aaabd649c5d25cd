"""Bad input through the real command lines: a one-line error naming the problem, exit 2, nothing written."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_clean_error(out, message):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


@pytest.fixture
def files(tmp_path):
    (tmp_path / "ok.csv").write_text("text,label\n" + "".join(f"sentence {i},{'ab'[i % 2]}\n" for i in range(30)))
    (tmp_path / "nolabel.csv").write_text("text,intent\nhello,a\nbye,b\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (tmp_path / "test_c.csv").write_text("text,label\nsomething,c\n")
    return tmp_path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lerning_rate=1e-3"], "unknown config key 'lerning_rate'"),
        (["data={d}/nolabel.csv"], "has no column 'label'"),
        (["data={d}/empty.tsv"], "has no rows"),
        (["data={d}/binary.csv"], "is not UTF-8 text"),
        (["data={d}/missing.csv"], "neither a builtin dataset"),
        (["data={d}/ok.csv", "test_data={d}/test_c.csv"], "never occur in train, e.g. 'c'"),
        (["method=lora", "lora_target_modules=qkv"], "match no Linear layer"),
        (["num_virtual_tokens=480"], "max_length (64) + num_virtual_tokens (480) exceeds the model's 512 positions"),
        (["head=crf"], "head=crf needs task=tagging"),
        (["task=tagging", "data={d}/ok.csv"], "line 1 is not 'token<TAB>tag'"),
    ],
)
def test_train_bad_input(files, overrides, message):
    run_dir = files / "run"
    out = _run("-m", "train", "--run", str(run_dir), "max_steps=1", *[o.format(d=files) for o in overrides])
    _assert_clean_error(out, message)
    assert not run_dir.exists()


def test_export_missing_and_corrupt_adapter(tmp_path):
    out = _run("-m", "export", "--run", str(tmp_path / "nothing"))
    _assert_clean_error(out, "does not exist (run `make train` first)")
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{not json")
    (adapter / "adapter_model.safetensors").write_bytes(b"junk")
    _assert_clean_error(_run("-m", "export", "--run", str(tmp_path / "run")), "is not valid JSON")
    assert not (tmp_path / "run" / "export").exists()


def test_export_refuses_an_adapter_for_another_base_model(runs, tmp_path):
    """A tiny-BERT prefix (2 layers, hidden 32) named onto MiniLM (6 layers, hidden 384) fails before any export."""
    from tests.helpers import minilm_path

    out = _run("-m", "export", "--run", str(runs("tiny", "p_tuning_v2")), "--base-model", str(minilm_path()))
    _assert_clean_error(out, "does not fit this base model")
