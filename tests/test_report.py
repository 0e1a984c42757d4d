"""report.py: the summary a person reads after a run (markdown, JSON, plot)."""

from __future__ import annotations

import json

from hh_lightning.report import export_size_table, markdown_table, write_report

LAYERS = [{"layer": i, "mse_init": 2.0 / (i + 1), "mse_final": 1.0 / (i + 1), "mse_folded": 1.0 / (i + 1),
           "steps": 4} for i in range(3)]
SIZES = {"file_bytes": 3 * 2**20, "fp16_model_bytes": 8 * 2**20, "ratio": 0.375,
         "by_kind": {"codes": 2 * 2**20, "rotations": 2**20}, "share": {"codes": 2 / 3, "rotations": 1 / 3}}


def test_markdown_table_takes_every_column_and_formats_cells() -> None:
    table = markdown_table([{"a": 1.234567, "b": None}, {"a": 2, "c": "x"}]).splitlines()
    assert table[0] == "| a | b | c |" and table[1] == "|---|---|---|"
    assert table[2] == "| 1.235 |  |  |" and table[3] == "| 2 |  | x |"
    assert markdown_table([]) == ""


def test_export_size_table_reports_the_whole_file_and_each_kind() -> None:
    text = export_size_table(SIZES, "runs/x/quantized")
    assert "3.0 MiB, **0.375x** the FP16 model (8.0 MiB)" in text
    assert "| codes | 2 | 66.7% |" in text and "| **whole file** | 3 | 100% |" in text


def test_write_report_writes_summary_files_and_plot(tmp_path) -> None:
    results = {"train_seconds": 12.5, "fp": {"ppl": 20.0, "n_windows": 2, "seq_len": 32},
               "quantized": {"ppl": 25.0, "n_windows": 2, "seq_len": 32}, "layers": LAYERS,
               "export_size": SIZES, "export_dir": "runs/x/quantized"}
    text = write_report(tmp_path, results)
    assert (tmp_path / "summary.md").read_text() == text
    assert json.loads((tmp_path / "summary.json").read_text()) == results
    assert "| quantized | 25 | 2 | 32 |" in text and "Training wall time: 12.5 s" in text
    assert "## Export size" in text
    assert (tmp_path / "layer_mse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_mse.png", "summary.json", "summary.md"]
