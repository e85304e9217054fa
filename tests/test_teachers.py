"""The teacher cache: altered, truncated or resized files are rebuilt; shared caches stay readable."""

import os
import stat

import pytest
import torch

from divmerge.teachers import get_or_compute, load_cached, save_atomic


def test_round_trip_of_tensors_and_dicts(tmp_path):
    value = torch.randn(5, 3)
    save_atomic(value, tmp_path / "a.pt")
    assert torch.equal(load_cached(tmp_path / "a.pt", rows=5), value)
    answers = {"tokens": torch.arange(10).reshape(5, 2), "lengths": torch.ones(5, dtype=torch.long)}
    save_atomic(answers, tmp_path / "b.pt")
    got = load_cached(tmp_path / "b.pt", rows=5)
    assert set(got) == set(answers) and all(torch.equal(got[k], answers[k]) for k in answers)


def test_a_replaced_file_of_the_right_shape_is_rebuilt(tmp_path):
    path = tmp_path / "t.pt"
    save_atomic(torch.zeros(4, 2), path)
    stored = torch.load(path, weights_only=True)
    stored["outputs"] = torch.ones(4, 2)  # other values, same shape, old digest
    torch.save(stored, path)
    assert load_cached(path, rows=4) is None
    value, built = get_or_compute(path, lambda: torch.full((4, 2), 7.0), rows=4)
    assert built and torch.equal(value, torch.full((4, 2), 7.0))
    assert torch.equal(load_cached(path, rows=4), value)


def test_wrong_rows_truncated_and_foreign_files_are_rebuilt(tmp_path):
    path = tmp_path / "t.pt"
    save_atomic(torch.zeros(4, 2), path)
    assert load_cached(path, rows=5) is None  # built for other data
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert load_cached(path, rows=4) is None
    torch.save(torch.zeros(4, 2), path)  # a plain tensor file without digest
    assert load_cached(path, rows=4) is None


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_cache_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_atomic(torch.zeros(2, 2), tmp_path / "t.pt")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "t.pt").stat().st_mode)
    assert mode == 0o666 & ~umask
