"""benchmarks.memory_model: its parameter counts match real models, its terms behave as the README says."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from benchmarks import memory_model as mm


def config(arch):
    kind = Qwen2Config if arch.qkv_bias else LlamaConfig
    heads = arch.hidden // 64 if arch.hidden < 4096 else arch.hidden // 128
    return kind(
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        intermediate_size=arch.intermediate,
        vocab_size=arch.vocab,
        num_attention_heads=heads,
        num_key_value_heads=arch.kv_dim // (arch.hidden // heads),
        tie_word_embeddings=arch.tied,
    )


@pytest.mark.parametrize("key", sorted(mm.ARCHITECTURES))
def test_parameter_counts_match_the_transformers_model(key):
    arch = mm.ARCHITECTURES[key]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(arch))
    assert sum(p.numel() for p in model.parameters()) == arch.params
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == arch.block


def test_terms_shard_and_per_block_is_smaller():
    arch = mm.ARCHITECTURES["llama-2-7b"]
    one = mm.per_rank_bytes(arch, 8, 1, 2, "per_block", 0.0)
    eight = mm.per_rank_bytes(arch, 8, 8, 2, "per_block", 0.0)
    assert eight["stored"] == pytest.approx(one["stored"] / 8) == pytest.approx((4 + 8 * 2) * arch.params / 8)
    assert eight["load"] < eight["load_whole"] / 8  # sharded loading: a share, not the whole set
    whole = mm.per_rank_bytes(arch, 8, 8, 2, "whole", 0.0)
    assert eight["transient"] < whole["transient"] / 5
    assert mm.per_rank_bytes(arch, 8, 8, 2, "whole", 1e9, start=True)["stored"] == pytest.approx(
        (8 + 8 * 2) * arch.params / 8
    )
    with pytest.raises(ValueError, match="mode must be"):
        mm.per_rank_bytes(arch, 8, 8, 2, "blocks", 0.0)
    fp32 = mm.per_rank_bytes(arch, 8, 8, 2, "per_block", 0.0, compute_bytes=4)
    assert fp32["transient"] - eight["transient"] == pytest.approx(4 * arch.block)  # bf16: 2 x 2 bytes less


def test_the_issue_goals_under_the_model_and_the_table(tmp_path):
    a = 8 * mm.GB
    assert mm.fewest_gpus(mm.ARCHITECTURES["llama-2-7b"], 8, 2, "per_block", a) <= 8  # one 8-GPU node
    assert mm.fewest_gpus(mm.ARCHITECTURES["llama-3-70b"], 8, 2, "per_block", a) <= 64  # eight nodes
    assert mm.fewest_gpus(mm.ARCHITECTURES["llama-3-70b"], 8, 2, "whole", a) is None  # the whole merge never
    assert mm.main(["--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert text.count("| per_block |") == 3 and "Llama-3-70B x 8" in text
