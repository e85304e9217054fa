import math

from divmerge.evaluation import TaskResult, anp, format_table


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
