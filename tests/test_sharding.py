"""Sharded merges (``divmerge.core.sharding``) on 2 and 3 gloo processes: the merged tensors are the
unsharded ones, and the coefficient gradient is the ranks' mean gradient (data parallel), LoRA factors
and the per-block gather included."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from divmerge.core import per_block
from divmerge.core.merged_model import MergedModel
from divmerge.families import causal_lm, load_experts
from tests.test_lora_causal import setup  # noqa: F401  (a tiny Qwen2 base, a full expert, a LoRA adapter)
from tests.test_sharded_loading import free_port


def init(rank: int, world: int, port: int) -> None:
    """Join the gloo group; a collective some rank never joins fails after 2 minutes instead of hanging."""
    address, timeout = f"tcp://127.0.0.1:{port}", timedelta(minutes=2)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=address, timeout=timeout)


def rank_weights(params: dict, rank: int) -> dict:
    """Each rank's own loss weights (its "data"): the loss is sum_n <weights[n], params[n]>."""
    g = torch.Generator().manual_seed(100 + rank)
    return {n: torch.randn(p.shape, generator=g) for n, p in params.items()}


def loss_and_grad(merged: MergedModel, params: dict, weights: dict) -> torch.Tensor:
    merged.coefficients.weight.grad = None
    sum((params[n] * w).sum() for n, w in weights.items()).backward()
    return merged.coefficients.weight.grad.clone()


def _compare(rank: int, world: int, port: int, base: str, experts: dict, mode: str) -> None:
    init(rank, world, port)
    try:
        expert_set = load_experts(base, experts)
        merge_mode = "whole" if mode == "whole" else "per_block"
        plain, sharded = (MergedModel(expert_set, merge_mode=merge_mode) for _ in range(2))
        table = torch.rand(plain.coefficients.weight.shape, generator=torch.Generator().manual_seed(7))
        for model in (plain, sharded):
            model.coefficients.weight.data.copy_(table)
        sharded.shard(init_device_mesh("cpu", (world,)))
        whole = plain.merged_params()
        expected = sum(
            loss_and_grad(plain, plain.merged_params(), rank_weights(whole, r)) for r in range(world)
        )
        bf16 = mode == "per_block_bf16"  # under bf16 autocast: blocks merge, gather and reduce in bf16
        if mode == "whole":
            params = sharded.merged_params()
        else:  # every block through the per-block gather, the rest merged whole
            params = sharded.step_params()
            table = params.pop("@table")
            for path in per_block.block_paths(sharded.skeleton(0)):  # in the same order on every rank
                names = sorted(n for n in sharded.block_tensors() if per_block.in_block(n, path))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    params |= sharded.merge_block(table, names)
        assert params.keys() == whole.keys()
        blocks = sharded.block_tensors()
        for n in whole:  # the gathered tensors are the unsharded merge (rounded to bf16 under autocast)
            linear = n in blocks and n in sharded.linear_weights()  # prefix "": full names are names
            want = whole[n].to(torch.bfloat16) if bf16 and linear else whole[n]
            assert params[n].dtype == want.dtype, (n, params[n].dtype, want.dtype)
            torch.testing.assert_close(params[n], want, rtol=1e-6, atol=1e-6)
        grad = loss_and_grad(sharded, params, rank_weights(whole, rank))
        tol = 2e-2 if bf16 else 1e-5  # bf16 weights: their gradient is rounded once, before the sum
        torch.testing.assert_close(grad, expected / world, rtol=tol, atol=tol)  # the ranks' mean
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode, world", [("whole", 2), ("per_block", 3), ("per_block_bf16", 2)])
def test_sharded_merge_and_gradient_equal_the_unsharded_mean_gradient(setup, mode, world):  # noqa: F811
    experts = {"first": setup["full"], "plain": setup["plain"]}  # a full expert and a LoRA adapter
    mp.spawn(_compare, args=(world, free_port(), setup["base"], experts, mode), nprocs=world)


def test_sharded_per_block_merge_of_adapters_alone(setup):  # noqa: F811
    """Only a LoRA adapter: every block tensor is the base's, gathered with the block, and the whole-on-
    every-rank factors' coefficient gradient is the ranks' mean."""
    mp.spawn(_compare, args=(2, free_port(), setup["base"], {"plain": setup["plain"]}, "per_block"), nprocs=2)


def _decode_unevenly(
    rank: int, world: int, port: int, base: str, experts: dict, bf16: bool, out: dict
) -> None:
    """Each rank decodes its own number of prompts for its own number of steps, per block and sharded
    (under bf16 autocast, as Lightning's bf16-mixed evaluation steps run, while the drain runs outside
    it, as an epoch-end hook does)."""
    init(rank, world, port)
    try:
        expert_set = load_experts(base, experts)
        plain, sharded = (MergedModel(expert_set, merge_mode="per_block") for _ in range(2))
        sharded.shard(init_device_mesh("cpu", (world,)))
        g = torch.Generator().manual_seed(rank)
        prompts = [torch.randint(3, 60, (4 + i,), generator=g) for i in range(2 + 3 * rank)]
        steps = 2 + 4 * rank  # rank 1 makes many more forwards than rank 0
        table = plain.one_hot_table(0)
        batches = [prompts[i : i + 2] for i in range(0, len(prompts), 2)]
        probes = []

        def probe(params: dict) -> None:
            probes.append(1)
            ids = torch.zeros((1, 1), dtype=torch.long)
            causal_lm.forward(sharded, params, ids, torch.ones_like(ids))

        params = sharded.eval_params(table)
        assert per_block.TABLE in params  # no whole merge: each forward gathers block by block
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            got = [causal_lm.generate(sharded, params, b, -1, 0, steps).tokens for b in batches]
        sharded.drain(probe)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reference = plain.eval_params(table)
            expected = [causal_lm.generate(plain, reference, b, -1, 0, steps).tokens for b in batches]
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
        out[rank] = len(probes)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bf16", [False, True])
def test_sharded_per_block_decoding_keeps_ranks_in_step(setup, bf16):  # noqa: F811
    """Ranks decode different numbers of batches for different numbers of steps: the ones done early
    stand in for the others' forwards (``drain``) and every rank's answers equal the unsharded merge's."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(
            _decode_unevenly,
            args=(2, free_port(), setup["base"], {"first": setup["full"]}, bf16, out),
            nprocs=2,
        )
        # rank 0: 1 batch x 2 forwards; rank 1: 3 batches x 6 forwards, so rank 0 stands in for 16
        assert dict(out) == {0: 16, 1: 0}
