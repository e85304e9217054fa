"""benchmarks.export_cost on tiny experts: one measured static export and the table."""

from benchmarks import export_cost as ec
from tests.test_cli import write_config


def test_static_export_is_measured_in_its_own_process(tmp_path, tiny):
    config = write_config(tmp_path, tiny)
    out = tmp_path / "export"
    row = ec.measure(["--config", config, "--model.method", "ties", "--out_dir", str(out)], threads=1)
    assert (out / "model.safetensors").is_file()
    assert row["wall_s"] > 0 and row["backbone_mb"] > 0
    assert row["peak_mb"] >= row["load_peak_mb"] >= row["rss_after_load_mb"] > 0
    assert row["peak_mb"] >= row["export_peak_mb"] >= row["rss_after_load_mb"] or not row["hwm_reset"]
    assert abs(row["child_maxrss_mb"] - row["peak_mb"]) < 0.1 * row["peak_mb"]  # wait4 sees that child
    table = ec.format_rows([{"job": "ties", **row}]).splitlines()
    assert table[0].startswith("| job | wall s") and table[2].startswith("| ties |")
    assert table[-1].startswith("| mergekit 0.1.5 TIES")
