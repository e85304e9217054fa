import json
import math

from divmerge.evaluation import TaskResult, anp, format_table, write_report


def test_anp_and_table_keep_held_out_tasks_apart():
    results = [
        TaskResult("a", 10, expert=0.8, merged=0.6, reference=0.4),
        TaskResult("b", 10, expert=0.5, merged=0.5, reference=0.25),
        TaskResult("c", 10, expert=0.4, merged=0.6, reference=0.2, held_out=True),
    ]
    assert math.isclose(anp(results), (0.75 + 1.0) / 2)
    assert math.isclose(anp(results, reference=True), (0.5 + 0.5) / 2)
    assert math.isclose(anp(results, held_out=True), 1.5)
    table = format_table(results)
    assert "c (held-out)" in table and "held-out vs base" in table and "0.8750" in table
    assert math.isnan(anp([]))


def test_an_expert_scoring_zero_is_left_out_of_anp_with_one_line(tmp_path):
    """A task whose expert scores 0 (e.g. it never answers the label words) is named, not a nan."""
    results = [
        TaskResult("a", 10, expert=0.8, merged=0.6, reference=0.4),
        TaskResult("b", 10, expert=0.0, merged=0.1, reference=0.0),
    ]
    assert math.isclose(anp(results), 0.75) and math.isclose(anp(results, reference=True), 0.5)
    table = format_table(results)
    assert "nan" not in table.lower()
    lines = table.splitlines()
    assert lines[3].split("|")[-2].strip() == "n/a"  # b's merged/expert
    assert lines[-1].startswith("Note: the expert of 'b' scores 0") and "left out of ANP" in lines[-1]
    assert "Note:" not in format_table(results[:1])
    report = json.loads((write_report(results, tmp_path, "test").with_suffix(".json")).read_text())
    assert math.isclose(report["anp"], 0.75) and report["left_out_of_anp"] == ["b"]
    assert report["tasks"][1]["normalised"] is None and report["held_out_anp"] is None


def test_only_zero_experts_give_no_anp():
    results = [TaskResult("b", 10, expert=0.0, merged=0.0, reference=0.0)]
    assert math.isnan(anp(results)) and "left out of ANP" in format_table(results)
