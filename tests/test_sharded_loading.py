"""Sharded loading: each rank reads only its columns of the base and experts, and gets exactly the shards
(and the fingerprint) that loading everything whole and then sharding gives."""

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from divmerge.core.digest import combine_digest, partial_digest, tensor_digest
from divmerge.core.sharding import shard_flat, shard_stacks
from divmerge.errors import DivMergeError
from divmerge.experts.lora_files import plain_lora_refusal
from divmerge.experts.sharded_loading import empty_model, linear_modules, load_sharded
from divmerge.experts.weight_files import WeightFiles, column_range
from divmerge.families import load_experts
from divmerge.families.causal_lm import CausalLM
from tests.test_lora_causal import setup  # noqa: F401  (a tiny Qwen2 base, a full expert, LoRA adapters)


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
        assert sharded.dense_rows == whole.dense_rows and sharded.lora.keys() == whole.lora.keys()
        for m, stack in whole.lora.items():  # plain LoRA adapters: the same factors, read from the file
            for key in ("a", "b", "task"):
                assert torch.equal(getattr(sharded.lora[m], key), getattr(stack, key)), (m, key)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, dtype", [(2, torch.float32), (3, torch.bfloat16)])
def test_sharded_loading_equals_whole_loading_then_sharding(lm, world, dtype):
    mp.spawn(_compare_with_whole_load, args=(world, free_port(), lm, dtype), nprocs=world)


def test_sharded_loading_reads_plain_lora_adapters_as_a_whole_load_does(setup):  # noqa: F811
    """A full expert and a plain LoRA adapter: the base and the full expert in shards, the adapter's
    factors from its file; everything, fingerprints included, equals a whole load then sharding."""
    lm = {"base": setup["base"], "experts": {"first": setup["full"], "plain": setup["plain"]}}
    mp.spawn(_compare_with_whole_load, args=(2, free_port(), lm, torch.float32), nprocs=2)


def test_adapters_that_are_not_plain_lora_are_read_whole(setup, tmp_path):  # noqa: F811
    """DoRA, or an adapter over another local base, falls back to the whole loader (which checks them)."""
    linear = linear_modules(empty_model(AutoModelForCausalLM, setup["base"]))
    assert "model.layers.0.self_attn.q_proj" in linear and "lm_head" not in linear  # tied to the embedding
    assert plain_lora_refusal(setup["plain"], setup["base"], linear) is None
    assert "use_dora" in plain_lora_refusal(setup["dora"], setup["base"], linear)
    other = tmp_path / "other"
    shutil.copytree(setup["plain"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path)  # another local directory
    (other / "adapter_config.json").write_text(json.dumps(config))
    assert "another local base" in plain_lora_refusal(str(other), setup["base"], linear)
    for key, value, reason in [
        ("init_lora_weights", "pissa", "changes the base weights"),  # peft rewrites W on load
        ("use_bdlora", {"nblocks": 2}, "it sets use_bdlora"),  # a variant this reader does not know
        ("bias", "all", "trains biases"),
    ]:
        config[key] = value
        (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
        assert reason in plain_lora_refusal(str(other), setup["base"], linear), key
        del config[key]
    assert "on 'model.layers.0.mlp.up_proj'" in plain_lora_refusal(
        setup["plain"], setup["base"], linear - {"model.layers.0.mlp.up_proj"}
    )


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
