"""benchmarks.gguf_export on the tiny causal-LM merge: measured exports, answers read back, the table."""

from benchmarks import gguf_export as ge


def test_exports_are_measured_and_read_back(tmp_path, lm):
    rows = ge.export_rows(lm["base"], lm["experts"], tmp_path, ("f32", "q8_0"))
    assert [r["type"] for r in rows] == ["hf", "f32", "q8_0"]
    assert (tmp_path / "export_q8_0" / "model.gguf").is_file()
    assert rows[2]["size_mb"] < rows[1]["size_mb"] and all(r["export_s"] > 0 for r in rows)
    assert all(r["added_peak_mb"] >= 0 for r in rows)
    ge.answer_rows(tmp_path, rows, max_new_tokens=3)
    assert rows[1]["answers_equal"] == len(ge.TEXTS) and rows[1]["max_logit_diff"] < 1e-5
    assert rows[1]["same_tokens"] and 0 < rows[2]["max_logit_diff"] < 0.1
    table = ge.format_rows(rows, len(ge.TEXTS)).splitlines()
    assert table[0].startswith("| output | file MB") and table[3].startswith("| f32 |")
