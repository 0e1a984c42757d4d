"""report.py: the summary a person reads after a run (markdown, JSON, plot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


# benchmarks/report.py: docs/results.md and README's headline table are generated from benchmarks/results/*.json.
REPO = Path(__file__).resolve().parents[1]


def _benchmarks_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_report", REPO / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_results_page_and_readme_table_are_current_with_the_json() -> None:
    report = _benchmarks_report()
    assert (REPO / "docs" / "results.md").read_text() == report.render_results(), \
        "docs/results.md is stale: run python benchmarks/report.py"
    readme = (REPO / "README.md").read_text()
    assert readme == report.render_readme(readme), "README.md's results table is stale: run python benchmarks/report.py"
    assert report.main(["--check"]) == 0


def test_every_result_json_is_rendered_and_every_table_states_its_provenance() -> None:
    report = _benchmarks_report()
    listed = {file for file, _ in report.SECTIONS}
    read_with_others = {p.name for p in (REPO / "benchmarks" / "results").glob("structures_*seed*.json")}
    read_with_others.add("cpu_recipe_kv4_summary.json")
    on_disk = {p.name for p in (REPO / "benchmarks" / "results").glob("*.json")}
    assert on_disk - listed - read_with_others == set(), "a results JSON that no section of report.py renders"
    page = report.render_results()
    for section in page.split("\n## ")[2:]:
        for field in ("- command: ", "- model: ", "- machine: ", "- date: ", "- data: "):
            assert field in section, (field, section[:80])


def test_a_new_rows_json_becomes_a_table_with_its_command_machine_and_date(tmp_path, monkeypatch) -> None:
    report = _benchmarks_report()
    data = {"command": "python benchmarks/x.py --fast", "machine": {"device": "cpu", "cpu_count": 2},
            "date": "2030-01-02", "rows": [{"form": "fp32", "tok/s": 10.0}, {"form": "int", "tok/s": 25.0}]}
    (tmp_path / "x.json").write_text(json.dumps(data))
    monkeypatch.setattr(report, "SECTIONS", [("x.json", report.rows_section("X", "What X measures.", "x.py")),
                                             ("absent.json", report.rows_section("Y", "", "y.py"))])
    page = report.render_results(tmp_path)
    assert "## X\n\nWhat X measures." in page and "## Y" not in page
    assert "- command: `python benchmarks/x.py --fast`" in page and "- date: 2030-01-02" in page
    assert "- machine: CPU (2 cores)" in page and "| int | 25 |" in page


def test_a_missing_field_reads_not_recorded_and_the_readme_region_is_replaced(tmp_path) -> None:
    report = _benchmarks_report()
    summary = {"fp": {"ppl": 20.0, "n_windows": 2, "seq_len": 64},
               "quantized": {"ppl": 30.0, "n_windows": 2, "seq_len": 64}, "export_size": {"ratio": 0.5}}
    (tmp_path / "demo_summary.json").write_text(json.dumps(summary))
    readme = f"intro\n{report.BEGIN}\nold table\n{report.END}\nrest\n"
    text = report.render_readme(readme, tmp_path)
    assert text.startswith("intro\n" + report.BEGIN) and text.endswith(report.END + "\nrest\n")
    assert "old table" not in text and "| demo | `make demo` | 2 × 64 | 20 | 30 | 1.5 | 0.5 | not recorded |" in text
