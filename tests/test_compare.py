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
