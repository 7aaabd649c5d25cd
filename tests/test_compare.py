"""`make compare` on a small spec: every stage runs, the report has a row per run, and a second call reuses them."""

import json

from bench.compare import main


def test_compare_writes_a_report_and_resumes(tmp_path, tiny_bert, capsys):
    small = ["max_train_samples=64", "max_eval_samples=40", "epochs=1", "max_steps=4", "max_length=32", f"base_model={tiny_bert}"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        json.dumps(
            {
                "runs": [
                    {"name": "ptv2", "config": "train/configs/default.yaml", "overrides": small},
                    {"name": "ner_crf", "config": "train/configs/ner.yaml", "overrides": [*small, "batch_size=8"]},
                ]
            }
        )
    )  # JSON is YAML
    out = tmp_path / "compare"
    assert main(["--spec", str(spec), "--out", str(out), "--budget", "0.05"]) == 0
    report = (out / "report.md").read_text()
    assert (
        "| ptv2 | p_tuning_v2 | intent (BANKING77) | linear |" in report
        and "| ner_crf | p_tuning_v2 | NER (WNUT-16) | crf |" in report
    )
    assert (out / "compare.png").stat().st_size > 1000 and (out / "ner_crf" / "bench" / "bench.json").is_file()
    capsys.readouterr()
    assert main(["--spec", str(spec), "--out", str(out), "--budget", "0.05"]) == 0
    assert ": train" not in capsys.readouterr().out  # finished stages are reused


def test_fingerprint_lines_repeat_to_the_bit_and_see_a_changed_run(tmp_path, tiny_bert, capsys):
    """bench.fingerprint is how a refactor shows it moved no result: the same rows twice give the same lines, and a
    row whose training differs (another seed) gives another adapter hash."""
    from bench.fingerprint import main as fingerprint

    small = ["max_length=32", f"base_model={tiny_bert}", "batch_size=16"]
    rows = tmp_path / "rows.yaml"
    rows.write_text(json.dumps({"runs": [
        {"name": "ptv2", "config": "train/configs/default.yaml", "overrides": small},
        {"name": "seed", "config": "train/configs/default.yaml", "overrides": [*small, "seed=7"]},
    ]}))  # fmt: skip
    lines = []
    for out in ("a", "b"):
        assert fingerprint([str(tmp_path / out), "--rows", str(rows)]) == 0
        lines.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert lines[0] == lines[1] and "onnx" in lines[0][0], lines
    assert lines[0][0]["adapter"] != lines[0][1]["adapter"]
