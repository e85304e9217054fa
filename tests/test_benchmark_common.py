"""benchmarks.common: one results writer, shared parent parsers, and scripts that never import each other."""

import argparse
import ast
import csv
import json
from pathlib import Path

from benchmarks.common.cli import lm_flags, run_flags, worker_flags
from benchmarks.common.results import write_csv, write_results

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")


def test_no_script_imports_another_or_patches_sys_path():
    offenders = []
    for name in SCRIPTS:
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks"):
                parts = node.module.split(".")
                names = [a.name for a in node.names]
                if parts[1:2] != ["common"] and (len(parts) > 1 or set(names) & set(SCRIPTS)):
                    offenders.append(f"{name}: from {node.module} import {names}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and getattr(node.value, "id", "") == "sys"
            ):
                offenders.append(f"{name}: sys.path")
    assert not offenders


def test_write_csv_unions_columns_and_leaves_out_excluded_keys(tmp_path):
    path = tmp_path / "deep" / "rows.csv"
    write_csv(path, [{"a": 1, "_x": 9}, {"b": 2.5, "a": 3}], exclude=("_x",))
    with path.open() as fh:
        assert list(csv.reader(fh)) == [["a", "b"], ["1", ""], ["3", "2.5"]]


def test_write_results_writes_markdown_and_json_rows(tmp_path):
    md = write_results(tmp_path / "out", "bench", "# table\n", [{"k": 1}])
    assert md.read_text() == "# table\n"
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == [{"k": 1}]
    write_results(tmp_path / "md_only", "bench", "x")
    assert not (tmp_path / "md_only" / "bench.json").exists()


def test_parent_parsers_carry_each_scripts_defaults():
    parser = argparse.ArgumentParser(
        parents=[run_flags(base="b", batch_size=3, seq_len=7, steps=2, warmup=0), worker_flags(1), lm_flags()]
    )
    args = parser.parse_args(["--steps", "5"])
    assert (args.base, args.batch_size, args.seq_len, args.steps, args.warmup) == ("b", 3, 7, 5, 0)
    assert (args.threads, args.worker, args.answer) == (1, None, 8)
    assert args.experts.startswith("zoo:smollm2/")
