"""Sharded merges (``divmerge.core.sharding``) on 2 and 3 gloo processes: the merged tensors are the
unsharded ones, and the coefficient gradient is the ranks' mean gradient (data parallel), LoRA factors
and the per-block gather included."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from divmerge.core import per_block
from divmerge.core.merged_model import MergedModel
from divmerge.families import load_experts
from tests.test_lora_causal import setup  # noqa: F401  (a tiny Qwen2 base, a full expert, a LoRA adapter)
from tests.test_sharded_loading import free_port


def rank_weights(params: dict, rank: int) -> dict:
    """Each rank's own loss weights (its "data"): the loss is sum_n <weights[n], params[n]>."""
    g = torch.Generator().manual_seed(100 + rank)
    return {n: torch.randn(p.shape, generator=g) for n, p in params.items()}


def loss_and_grad(merged: MergedModel, params: dict, weights: dict) -> torch.Tensor:
    merged.coefficients.weight.grad = None
    sum((params[n] * w).sum() for n, w in weights.items()).backward()
    return merged.coefficients.weight.grad.clone()


def _compare(rank: int, world: int, port: int, base: str, experts: dict, mode: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        expert_set = load_experts(base, experts)
        plain, sharded = (MergedModel(expert_set, merge_mode=mode) for _ in range(2))
        table = torch.rand(plain.coefficients.weight.shape, generator=torch.Generator().manual_seed(7))
        for model in (plain, sharded):
            model.coefficients.weight.data.copy_(table)
        sharded.shard(init_device_mesh("cpu", (world,)))
        whole = plain.merged_params()
        expected = sum(
            loss_and_grad(plain, plain.merged_params(), rank_weights(whole, r)) for r in range(world)
        )
        if mode == "whole":
            params = sharded.merged_params()
        else:  # every block through the per-block gather, the rest merged whole
            params = sharded.step_params()
            table = params.pop("@table")
            for path in per_block.block_paths(sharded.skeleton(0)):  # in the same order on every rank
                names = sorted(n for n in sharded.block_tensors() if per_block.in_block(n, path))
                params |= sharded.merge_block(table, names)
        assert params.keys() == whole.keys()
        for n in whole:  # the gathered tensors are the unsharded merge
            torch.testing.assert_close(params[n], whole[n], rtol=1e-6, atol=1e-6)
        grad = loss_and_grad(sharded, params, rank_weights(whole, rank))
        torch.testing.assert_close(grad, expected / world, rtol=1e-5, atol=1e-5)  # the ranks' mean
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode, world", [("whole", 2), ("per_block", 3)])
def test_sharded_merge_and_gradient_equal_the_unsharded_mean_gradient(setup, mode, world):  # noqa: F811
    experts = {"first": setup["full"], "plain": setup["plain"]}  # a full expert and a LoRA adapter
    mp.spawn(_compare, args=(world, free_port(), setup["base"], experts, mode), nprocs=world)
