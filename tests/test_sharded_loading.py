"""Sharded loading: each rank reads only its columns of the base and experts, and gets exactly the shards
(and the fingerprint) that loading everything whole and then sharding gives."""

import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh

from divmerge.core.digest import combine_digest, partial_digest, tensor_digest
from divmerge.core.sharding import shard_flat, shard_stacks
from divmerge.errors import DivMergeError
from divmerge.experts.sharded_loading import load_sharded
from divmerge.experts.weight_files import WeightFiles, column_range
from divmerge.families import load_experts
from divmerge.families.causal_lm import CausalLM


@pytest.mark.parametrize("shape", [(7, 5, 3), (11,), (), (2, 3000), (0, 4)])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_columns_read_from_the_file_cover_the_tensor_once_like_dtensor_shards(tmp_path, shape, world):
    tensor = torch.randn(shape).to(torch.bfloat16)
    save_file({"w": tensor}, tmp_path / "model.safetensors")
    files = WeightFiles(tmp_path, "the base model")
    flat = tensor.float().reshape(-1)
    pieces = [files.read_columns("w", *column_range(flat.numel(), r, world)) for r in range(world)]
    assert torch.equal(torch.cat(pieces), flat)
    chunks = torch.chunk(flat, world) if flat.numel() else ()  # DTensor's Shard uses torch.chunk's sizes
    assert [len(p) for p in pieces if len(p)] == [len(c) for c in chunks]
    # the digest of the shards, assembled, equals the digest of the whole tensor
    starts = [column_range(flat.numel(), r, world)[0] for r in range(world)]
    parts = [partial_digest(p, lo, flat.numel()) for p, lo in zip(pieces, starts, strict=True)]
    assert combine_digest(flat.shape, flat.dtype, parts) == tensor_digest(flat)


def test_digest_sees_a_change_anywhere():
    tensor = torch.randn(5000)
    changed = tensor.clone()
    changed[4321] += 1e-3  # not one of the sampled elements (every 4th)
    assert tensor_digest(changed) != tensor_digest(tensor)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare_with_whole_load(rank: int, world: int, port: int, lm: dict, dtype: torch.dtype) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        mesh = init_device_mesh("cpu", (world,))
        sharded = load_experts(lm["base"], lm["experts"], task_vector_dtype=dtype, mesh=mesh)
        whole = load_experts(lm["base"], lm["experts"], task_vector_dtype=dtype)
        assert sharded.fingerprint == whole.fingerprint and sharded.task_digests == whole.task_digests
        assert sharded.names == whole.names and sharded.num_labels == whole.num_labels
        assert sharded.shapes == {n: t.shape for n, t in whole.base.items()}
        stacks, base = shard_stacks(whole.task_vectors, mesh), shard_flat(whole.base, mesh)
        for n in whole.names:
            assert torch.equal(sharded.task_vectors[n].to_local(), stacks[n].to_local()), n
            assert torch.equal(sharded.base[n].to_local(), base[n].to_local()), n
            assert sharded.task_vectors[n].shape == stacks[n].shape and sharded.base[n].shape == base[n].shape
            assert sharded.task_vectors[n].to_local().dtype == dtype
        assert sharded.buffers.keys() == whole.buffers.keys()
        assert all(torch.equal(sharded.buffers[n], whole.buffers[n]) for n in whole.buffers)
        assert [type(s) for s in sharded.skeletons] == [type(s) for s in whole.skeletons]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, dtype", [(2, torch.float32), (3, torch.bfloat16)])
def test_sharded_loading_equals_whole_loading_then_sharding(lm, world, dtype):
    mp.spawn(_compare_with_whole_load, args=(world, free_port(), lm, dtype), nprocs=world)


def _load_one(rank: int, world: int, port: int, base: str, experts: dict) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:  # straight through the sharded loader (a whole load words these errors alike)
        paths = {"base": base, **experts}
        load_sharded(CausalLM(), paths, paths, init_device_mesh("cpu", (world,)), None)
    finally:
        dist.destroy_process_group()


def _copy_without(src: str, dst: Path, drop: str | None = None, reshape: str | None = None) -> str:
    """A copy of an expert directory with one tensor dropped, or one tensor's shape changed."""
    dst.mkdir()
    for f in Path(src).iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(Path(src) / "model.safetensors")
    tensors.pop(drop or "", None)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"drop": "model.norm.weight"}, "Expert 'has_a' at .* lacks trained weights \\['model.norm"),
        ({"reshape": "model.norm.weight"}, "Expert 'has_a' tensor 'model.norm.weight' has shape \\(31,\\)"),
    ],
)
def test_sharded_loading_refuses_an_expert_missing_or_reshaping_a_tensor(tmp_path, lm, change, message):
    experts = {**lm["experts"], "has_a": _copy_without(lm["experts"]["has_a"], tmp_path / "bad", **change)}
    with pytest.raises(Exception) as raised:
        mp.spawn(_load_one, args=(2, free_port(), lm["base"], experts), nprocs=2)
    assert DivMergeError.__name__ in str(raised.value)
    assert re.search(message, str(raised.value)), str(raised.value)[-600:]
