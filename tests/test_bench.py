"""make bench's machinery on a tiny exported run: every implementation timed on every cell, files written."""

import json
import shutil

from bench.__main__ import main


def test_bench_writes_table_json_and_plot(exported, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported("tiny", "lora"), run)  # leave the shared fixture run as it was
    assert main(["--run", str(run), "--budget", "0.03"]) == 0
    result = json.loads((run / "bench" / "bench.json").read_text())
    assert result["provider"] == "CPUExecutionProvider" and result["method"] == "lora"
    assert [(r["inputs"], r["batch"]) for r in result["rows"]] == [(k, b) for k in ("seq128", "dev") for b in (1, 8, 32)]
    for row in result["rows"]:
        for name in ("eager", "peft", "onnx", "int8"):
            assert row[f"{name}_p50_ms"] > 0 and row[f"{name}_p95_ms"] >= row[f"{name}_p50_ms"]
        assert abs(row["ratio_eager_over_onnx"] - row["eager_p50_ms"] / row["onnx_p50_ms"]) < 1e-9
    assert result["rows"][0]["seq_len"] == 128
    assert (run / "bench" / "latency.png").stat().st_size > 1000
    assert "eager p50" in capsys.readouterr().out  # the printed table
