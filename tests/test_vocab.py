"""Experts with extended vocabularies (divmerge.experts.vocab and the causal-LM family's added rows), on
tiny random causal LMs."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, Qwen2ForCausalLM

import train
from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.experts.vocab import tokenizer_source, vocabulary
from divmerge.families import causal_lm, load_experts
from tests import tiny_lm
from tests.test_generative import PROMPTS, prompts, write_config

V0 = tiny_lm.vocab_size()  # the base's embedding rows
X1, X2 = V0 + 1, V0 + 2  # ids of added tokens: the Qwen2 tokenizer already holds <|endoftext|> at V0


def extend(expert: str, out: Path, tokens: list[str], pad_to: int | None = None, seed: int = 0) -> str:
    """``expert`` with ``tokens`` added to its tokenizer and random rows for them (then padded rows)."""
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(expert)
    tok.add_tokens(tokens)
    model = Qwen2ForCausalLM.from_pretrained(expert)
    model.resize_token_embeddings(pad_to or len(tok), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[V0:] = torch.randn(model.config.vocab_size - V0, 32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vocab")
    setup = tiny_lm.make_setup(root)
    first, has_a = setup["experts"]["first"], setup["experts"]["has_a"]
    setup["two"] = extend(first, root / "two", ["<x1>", "<x2>"])  # adds <x1>, <x2>
    setup["one"] = extend(has_a, root / "one", ["<x1>"], seed=1)  # adds <x1> too
    setup["other"] = extend(has_a, root / "other", ["<y1>"])  # adds another token at the same id
    setup["padded"] = extend(has_a, root / "padded", [], pad_to=V0 + 3)  # rows, no tokens
    return setup


def embedding(path: str) -> torch.Tensor:
    return Qwen2ForCausalLM.from_pretrained(path).get_input_embeddings().weight.detach()


def test_vocabulary_reads_sizes_and_picks_the_tokenizer_with_every_added_token(lm):
    vocab = vocabulary(lm["base"], {"a": lm["two"], "b": lm["one"], "c": lm["experts"]["has_a"]})
    assert (vocab.base_size, vocab.size, vocab.extended) == (V0, X2 + 1, True)
    assert vocab.sizes == {"a": X2 + 1, "b": X1 + 1, "c": V0} and vocab.tokenizer == lm["two"]
    assert not vocabulary(lm["base"], lm["experts"]).extended
    assert tokenizer_source(lm["base"], {"a": lm["one"], "b": "zoo:not-built-yet"}) == lm["one"]


def test_one_hot_coefficients_reproduce_an_extended_expert_and_a_plain_one(lm):
    experts = load_experts(lm["base"], {"first": lm["two"], "has_a": lm["experts"]["has_a"]})
    assert experts.num_labels == [X2 + 1, X2 + 1]
    merged = MergedModel(experts)
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=0)
    real = mask.bool()
    with torch.no_grad():
        ours = causal_lm.forward(merged, merged.merged_params(merged.one_hot_table(0)), ids, mask).logits
        plain = causal_lm.forward(merged, merged.merged_params(merged.one_hot_table(1)), ids, mask).logits
        theirs = Qwen2ForCausalLM.from_pretrained(lm["two"]).eval()(input_ids=ids, attention_mask=mask).logits
        has_a = Qwen2ForCausalLM.from_pretrained(lm["experts"]["has_a"]).eval()
        has_a = has_a(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)  # every token, added ones too
    torch.testing.assert_close(plain[real][:, :V0], has_a[real], atol=1e-5, rtol=0)  # the base's tokens


def test_added_rows_merge_over_the_experts_that_have_them(lm):
    merged = MergedModel(load_experts(lm["base"], {"first": lm["two"], "has_a": lm["one"]}))
    name = "model.embed_tokens.weight"
    two, one = embedding(lm["two"]), embedding(lm["one"])
    assert torch.allclose(merged.base[name][X1], (two[X1] + one[X1]) / 2)  # <x1>: both experts' mean
    for table in (torch.full_like(merged.one_hot_table(0), 0.3), merged.one_hot_table(1)):
        row = merged.merged_params(table)[name][X2]  # <x2>: only "two" has it, whatever the weights
        torch.testing.assert_close(row, two[X2])
    torch.testing.assert_close(merged.merged_params(merged.one_hot_table(1))[name][X1], one[X1])


def test_padded_rows_without_tokens_merge(lm):
    merged = MergedModel(load_experts(lm["base"], {"first": lm["experts"]["first"], "has_a": lm["padded"]}))
    assert merged.base["model.embed_tokens.weight"].shape[0] == V0 + 3


def test_disagreeing_added_tokens_are_refused_naming_the_first(lm):
    with pytest.raises(DivMergeError, match=rf"disagree on added token {X1}: '<x1>' vs '<y1>'"):
        load_experts(lm["base"], {"first": lm["two"], "has_a": lm["other"]})


def test_an_expert_vocabulary_smaller_than_the_base_is_refused(lm, tmp_path):
    model = Qwen2ForCausalLM.from_pretrained(lm["experts"]["first"])
    model.resize_token_embeddings(V0 - 2)
    model.save_pretrained(tmp_path / "smaller")
    with pytest.raises(DivMergeError, match=f"vocabulary of {V0 - 2} tokens, fewer than the base's {V0}"):
        load_experts(lm["base"], {"first": str(tmp_path / "smaller"), "has_a": lm["experts"]["has_a"]})


def test_an_adapter_beside_an_extended_expert_is_refused(lm, tmp_path):
    model = get_peft_model(
        Qwen2ForCausalLM.from_pretrained(lm["base"]),
        LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]),
    )
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(
        DivMergeError, match="is a LoRA adapter but other experts extend the base's vocabulary"
    ):
        load_experts(lm["base"], {"first": lm["two"], "has_a": str(tmp_path / "adapter")})


def test_fit_and_export_with_an_extended_expert(lm, tmp_path, capsys):
    """The data use the extended tokenizer; the export has the merged vocabulary and that tokenizer."""
    config = write_config(tmp_path, {**lm, "experts": {"first": lm["two"], "has_a": lm["one"]}}, epochs=1)
    cli = train.main(["fit", "--config", config])
    assert len(cli.datamodule.tokenizer) == X2 + 1
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    out = tmp_path / "out"
    train.main(["export", "--config", config, "--ckpt_path", str(ckpt), "--out_dir", str(out)])
    model = Qwen2ForCausalLM.from_pretrained(out).eval()
    assert (
        model.config.vocab_size == X2 + 1
        and json.loads((out / "config.json").read_text())["vocab_size"] == X2 + 1
    )
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<x2>") == X2
    merged = cli.model.merged
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=0)
    with torch.no_grad():
        ours = causal_lm.forward(merged, merged.merged_params(), ids, mask).logits
    theirs = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)
