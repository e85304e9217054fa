"""The per-block merge (``merge_mode: per_block``): the whole merge's step, one block alive at a time."""

import re

import pytest
import torch
from torch.func import functional_call

import train
from divmerge.core import per_block
from divmerge.core.merged_model import MergedModel
from divmerge.engine import Merger
from divmerge.errors import DivMergeError
from divmerge.families import causal_lm, load_experts
from divmerge.families.classification import step_loss, task_logits
from divmerge.objectives import js_divergence
from tests import tiny_lm
from tests.test_cli import coefficients, write_config
from tests.test_generative import PROMPTS, prompts
from tests.test_lora_causal import setup  # noqa: F401  (a tiny Qwen2 base, a full expert, a LoRA adapter)
from tests.tiny import random_batches, randomise_coefficients


@pytest.fixture(scope="module")
def expert_set(tiny):
    return load_experts(tiny["base"], tiny["experts"])


def test_block_paths_are_the_transformer_layers(expert_set):
    merged = MergedModel(expert_set, merge_mode="per_block")
    assert per_block.block_paths(merged.skeleton(0)) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    blocks = merged.block_tensors()
    assert blocks and all(n.startswith("bert.encoder.layer.") for n in blocks)
    assert "bert.embeddings.word_embeddings.weight" not in blocks
    params = merged.step_params()
    assert params[per_block.TABLE] is not None
    for name in blocks:  # the block tensors are their origins, not merged copies
        assert params[name].data_ptr() == merged.base[name.removeprefix("bert.")].data_ptr()


@pytest.mark.parametrize("backbone_pass", ["per_task", "joint"])
@pytest.mark.parametrize(("granularity", "start"), [("layer", None), ("row", None), ("block", "tsv_m")])
def test_step_equals_the_whole_model_merge(expert_set, granularity, start, backbone_pass):
    batches, teachers = random_batches()
    results = {}
    for mode in ("whole", "per_block"):
        merger = Merger.from_expert_set(
            expert_set, granularity=granularity, start_from=start, merge_mode=mode
        )
        merged = merger.build()
        randomise_coefficients(merged)
        loss, per_task = step_loss(
            merged,
            merged.step_params(),
            batches,
            lambda t, student: js_divergence(teachers[t], student).mean(),
            backbone_pass=backbone_pass,
        )
        loss.backward()
        results[mode] = (loss.detach(), per_task, merged.coefficients.weight.grad.clone())
    (la, pa, ga), (lb, pb, gb) = results["whole"], results["per_block"]
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(pa[1], pb[1])
    assert ga.abs().sum() > 0
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_bf16_autocast_step_matches_the_whole_merge(expert_set):
    """Under bf16-mixed the blocks run in bf16 and the merge in float32, in both modes alike; per block,
    the merged block matrices come in bf16 (no float32 copy of a block's merge is kept)."""
    batches, teachers = random_batches()
    grads = {}
    dtypes = set()
    for mode in ("whole", "per_block"):
        merged = MergedModel(expert_set, merge_mode=mode)
        randomise_coefficients(merged)
        merge_block = merged.merge_block

        def recorded(table, names, merge_block=merge_block):
            out = merge_block(table, names)
            dtypes.update(t.dtype for t in out.values() if t.dim() >= 2)  # norms' vectors: float32
            return out

        merged.merge_block = recorded
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = step_loss(
                merged,
                merged.step_params(),
                batches,
                lambda t, student: js_divergence(teachers[t], student.float()).mean(),
            )
        loss.backward()
        grads[mode] = merged.coefficients.weight.grad.clone()
    assert dtypes == {torch.bfloat16}
    scale = grads["whole"].abs().max()
    assert scale > 0 and (grads["whole"] - grads["per_block"]).abs().max() < 2e-3 * scale  # 2.7e-4 measured


def saved_bytes(merged: MergedModel, run) -> int:
    """Bytes autograd keeps for backward during ``run()``, stored tensors (base, task vectors) excluded."""
    stored = {
        x.data_ptr()
        for store in (merged.base, merged.task_vectors)
        for _, t in store.items()
        for x in (t if isinstance(t, tuple) else (t,))
    }
    kept = {}

    def pack(t):
        if t.data_ptr() not in stored:
            kept[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


def test_causal_lm_with_a_lora_expert_equals_whole_and_keeps_no_block_for_backward(setup):  # noqa: F811
    experts = load_experts(setup["base"], {"first": setup["full"], "has_a": setup["plain"]})
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=tiny_lm.PAD_ID)  # (B, L)
    weight = torch.randn(*ids.shape, tiny_lm.vocab_size(), generator=torch.Generator().manual_seed(0))
    out, grads, kept = {}, {}, {}
    calls: list[list[str]] = []
    for mode in ("whole", "per_block"):
        merged = MergedModel(experts, merge_mode=mode)
        assert merged.lora_b  # the adapter stays factored in both modes
        randomise_coefficients(merged)
        if mode == "per_block":
            merge = merged.merge_block
            merged.merge_block = lambda table, names, merge=merge: (
                calls.append(list(names)) or merge(table, names)
            )
        holder = {}

        def run(merged=merged, holder=holder):
            holder["logits"] = causal_lm.forward(merged, merged.step_params(), ids, mask).logits

        kept[mode] = saved_bytes(merged, run)
        (holder["logits"] * weight).sum().backward()
        out[mode], grads[mode] = holder["logits"].detach(), merged.coefficients.weight.grad.clone()
    torch.testing.assert_close(out["whole"], out["per_block"])
    assert grads["whole"].abs().sum() > 0
    torch.testing.assert_close(grads["whole"], grads["per_block"], atol=1e-6, rtol=1e-4)
    blocks = [re.match(r"model\.layers\.(\d+)\.", names[0]).group(1) for names in calls]
    for block, names in zip(blocks, calls, strict=True):  # each call merges one block's tensors only
        assert all(n.startswith(f"model.layers.{block}.") for n in names)
    layers = len(merged.skeleton(0).model.layers)
    assert blocks == [str(i) for i in range(layers)] + [str(i) for i in reversed(range(layers))]  # recomputed
    block_bytes = sum(merged.base[n].numel() * 4 for n in merged.block_tensors())
    assert kept["whole"] - kept["per_block"] > 0.9 * block_bytes  # the merged blocks are not kept


def test_fit_per_block_learns_the_same_coefficients(tmp_path, tiny):
    tables = {}
    for mode in ("whole", "per_block"):
        (tmp_path / mode).mkdir()
        config = write_config(tmp_path / mode, tiny, epochs=1)
        train.main(["fit", "--config", config, "--model.merge_mode", mode])
        tables[mode] = coefficients(tmp_path / mode / "run" / "ckpt" / "last.ckpt")
    assert (tables["whole"] != 1 / 2).any()
    torch.testing.assert_close(tables["whole"], tables["per_block"], atol=1e-5, rtol=1e-4)


def test_bad_merge_modes_are_refused(tmp_path, tiny, expert_set, capsys):
    with pytest.raises(DivMergeError, match="must be one of 'auto', 'whole', 'per_block', not 'blocks'"):
        Merger(tiny["base"], tiny["experts"], merge_mode="blocks")
    with pytest.raises(DivMergeError, match="must be one of 'whole', 'per_block', not 'auto'"):
        MergedModel(expert_set, merge_mode="auto")  # the engine resolves auto before the model sees it
    with pytest.raises(SystemExit) as exit_info:  # the CLI's own check of the Literal
        train.main(["fit", "--config", write_config(tmp_path, tiny), "--model.merge_mode", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.merge_mode" in err and "'whole', 'per_block'" in err and "Traceback" not in err


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.register_buffer("shift", torch.zeros(3))

    def forward(self, x):
        return torch.tanh(self.linear(x)) + self.shift


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])
        self.out = torch.nn.Linear(3, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def test_attached_merges_each_block_and_leaves_buffers_alone():
    """The per-block mechanism alone, on a toy model whose blocks hold a buffer."""
    g = torch.Generator().manual_seed(0)
    root = Toy().to("meta")
    shapes = {n: p.shape for n, p in Toy().named_parameters()}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    tau = {n: torch.randn(2, *s, generator=g) for n, s in shapes.items()}  # (T, *shape)
    buffers = {f"layers.{i}.shift": torch.randn(3, generator=g) for i in range(2)}
    x = torch.randn(4, 3, generator=g)

    def merge(table, names):
        return {n: base[n] + torch.tensordot(table, tau[n], dims=1) for n in names if n in base}

    grads = []
    for per_block_mode in (False, True):
        table = torch.tensor([0.3, -0.7], requires_grad=True)
        merged = {
            n: base[n] if per_block_mode and n.startswith("layers.") else merge(table, [n])[n] for n in base
        }
        tensors = merged | buffers | ({per_block.TABLE: table} if per_block_mode else {})
        with per_block.attached(root, "", tensors, merge) as outer:
            assert per_block.TABLE not in outer and outer.keys() == (merged | buffers).keys()
            out = functional_call(root, outer, (x,), strict=True)
        assert "forward" not in vars(root.layers[0])  # unpatched on exit
        out.sum().backward()
        grads.append((out.detach(), table.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert per_block.block_paths(root) == ["layers.0", "layers.1"]


def test_teachers_and_evaluation_merge_per_block_and_match_the_whole_merge(lm, expert_set):
    """In the per-block mode an expert's teacher (a one-hot merge) and a learned-merge evaluation merge
    one block at a time, never the whole model, and give the whole merge's answers and distributions."""
    experts = load_experts(lm["base"], lm["experts"])
    batch = dict(
        zip(("input_ids", "attention_mask"), causal_lm.pad_sequences(prompts(PROMPTS), 0), strict=True)
    )
    batch["idx"] = torch.arange(len(PROMPTS))
    outputs = {}
    for mode in ("whole", "per_block"):
        merged = MergedModel(experts, merge_mode=mode)
        params = merged.step_params(merged.one_hot_table(1))
        assert (per_block.TABLE in params) == (mode == "per_block")
        merges, wholes = [], []
        merge_block, merged_params = merged.merge_block, merged.merged_params
        merged.merge_block = lambda t, names, f=merge_block, seen=merges: seen.append(names) or f(t, names)
        merged.merged_params = lambda *a, f=merged_params, seen=wholes: seen.append(a) or f(*a)
        teacher = causal_lm.build_teacher(merged, 1, [batch], len(PROMPTS), 1, 0, max_new_tokens=4, top_k=3)
        assert bool(merges) == (mode == "per_block") != bool(wholes)  # per block: never a whole merge
        assert all(set(n) <= merged.block_tensors() for n in merges)
        outputs[mode] = teacher
    assert torch.equal(outputs["whole"]["tokens"], outputs["per_block"]["tokens"])
    torch.testing.assert_close(outputs["whole"]["logprobs"], outputs["per_block"]["logprobs"])
    # classification: the learned merge's evaluation params, per block, score as the whole merge does
    batches, _ = random_batches()
    logits = {}
    for mode in ("whole", "per_block"):
        merger = Merger.from_expert_set(expert_set, merge_mode=mode)
        randomise_coefficients(merger.build())
        params = merger.learned_params(whole=False)
        assert (per_block.TABLE in params) == (mode == "per_block")
        assert all(not v.requires_grad for v in params.values())
        logits[mode] = task_logits(merger.merged, 1, params, **batches[1])
    torch.testing.assert_close(logits["whole"], logits["per_block"])
