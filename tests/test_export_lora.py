"""``export --format lora``: one peft adapter, exact for LoRA experts, SVD-compressed at a chosen rank."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, Qwen2ForCausalLM

import train
from divmerge.core import lora
from divmerge.core.merged_model import MergedModel
from divmerge.engine import Merger
from divmerge.errors import DivMergeError
from divmerge.export import coefficient_stats, export_lora, read_export_info
from divmerge.export.lora_adapter import truncated, truncated_factors
from divmerge.families import causal_lm, load_experts
from divmerge.families.classification import task_logits
from tests import tiny_lm
from tests.test_cli import expect_error, write_config
from tests.test_generative import PROMPTS, prompts
from tests.test_lora import batch, make_lora_expert
from tests.test_lora_causal import make_lora_lm

TOL = 1e-5
TARGETS_AT_RANK_3 = ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"]  # LoRA rank 6, 4, 4 > 3


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def random_table(merged: MergedModel, seed: int) -> None:
    with torch.no_grad():
        merged.coefficients.weight.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(seed))


def lm_logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=tiny_lm.PAD_ID)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def merged_lm_logits(merged: MergedModel, params: dict) -> torch.Tensor:
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=tiny_lm.PAD_ID)
    with torch.no_grad():
        return causal_lm.forward(merged, params, ids, mask).logits[mask.bool()]


def full_lm(base: Path, path: Path, seed: int) -> Path:
    """A "fully fine-tuned" expert: every tensor of the base moved (embeddings, norms, biases too)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    tiny_lm.tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict:
    """A tiny Qwen2 whose matrices are all at least 32 wide, two LoRA adapters, two full experts."""
    root = tmp_path_factory.mktemp("lora_export_lm")
    config = tiny_lm.config()
    config.num_key_value_heads = 2  # k_proj / v_proj (32, 32): every matrix has min(out, in) = 32
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "base")
    tiny_lm.tokenizer().save_pretrained(root / "base")
    base = root / "base"
    return {
        "base": str(base),
        "lora_a": str(make_lora_lm(base, root / "lora_a", seed=1)),  # q, v, up at r=4
        "lora_b": str(make_lora_lm(base, root / "lora_b", seed=2, r=2, target_modules=["q_proj", "o_proj"])),
        "full_a": str(full_lm(base, root / "full_a", seed=3)),
        "full_b": str(full_lm(base, root / "full_b", seed=4)),
    }


def test_exact_adapter_of_lora_lm_experts_reproduces_the_merge_through_peft(lms, tmp_path, monkeypatch):
    experts = {"a": lms["lora_a"], "b": lms["lora_b"]}
    merged = MergedModel(load_experts(lms["base"], experts), granularity="layer")
    random_table(merged, 0)
    with torch.no_grad():
        params = merged.merged_params()

    def dense(*args, **kwargs):
        raise AssertionError("the exact adapter export built the dense merged model")

    monkeypatch.setattr(merged, "dense_params", dense)
    summary = {"method": "divmerge", "coefficients": coefficient_stats(merged.coefficients(), ["a", "b"])}
    out, note = export_lora(merged, params, lms["base"], tmp_path / "adapter", summary)
    assert note.startswith("exact LoRA adapter")
    peft = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(lms["base"]), out).eval()
    want = merged_lm_logits(merged, params)
    assert relative(lm_logits(peft), want) < TOL
    assert relative(lm_logits(Qwen2ForCausalLM.from_pretrained(lms["base"])), want) > 1e-2  # it moved
    config = json.loads((out / "adapter_config.json").read_text())
    q, up = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"
    assert config["r"] == 4 and config["rank_pattern"] == {  # q: 4 + 2 stacked; o: b's 2 alone
        **{f"model.layers.{i}.self_attn.q_proj": 6 for i in range(2)},
        **{f"model.layers.{i}.self_attn.o_proj": 2 for i in range(2)},
    }
    assert config["alpha_pattern"] == config["rank_pattern"] and config["modules_to_save"] is None
    weights = load_file(out / "adapter_model.safetensors")
    assert weights[f"base_model.model.{up}.lora_A.weight"].shape == (4, 32)
    assert weights[f"base_model.model.{q}.lora_B.weight"].shape == (32, 6)
    info = read_export_info(out)
    assert info["adapter"]["exact"] and info["adapter"]["relative_errors"] == {}
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "exact" in card
    # at --lora_rank 3: the rank-6 and rank-4 stacks are compressed (SVD through their factors), o_proj kept
    out, note = export_lora(merged, params, lms["base"], tmp_path / "r3", summary, rank=3)
    errors = read_export_info(out)["adapter"]["relative_errors"]
    assert set(errors) == {f"model.layers.{i}.{m}" for i in range(2) for m in TARGETS_AT_RANK_3}
    factors = dict(lora.split(params)[1])
    plain = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(lms["base"]), out).merge_and_unload()
    weights = plain.state_dict()
    for m, error in errors.items():
        a, b = factors[m]
        update = (b @ a).double()  # (out, in), dense only here, for the check
        u, singular, vh = torch.linalg.svd(update, full_matrices=False)
        best = u[:, :3] @ torch.diag(singular[:3]) @ vh[:3]  # Eckart-Young, independently
        got = weights[f"{m}.weight"].double() - merged.base[f"{m}.weight"].double()  # what peft applies
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
        assert error == pytest.approx(((update - best).norm() / update.norm()).item(), rel=1e-3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and set(config["rank_pattern"].values()) == {2}  # o_proj's rank 2 kept


def test_exact_adapter_of_lora_classifier_experts_reproduces_backbone_and_task_models(tmp_path):
    from tests.tiny import make_base

    base = make_base(tmp_path / "base")
    experts = {
        "three": str(make_lora_expert(base, tmp_path / "three", 3, seed=2)),
        "two": str(make_lora_expert(base, tmp_path / "two", 2, seed=3, target_modules=["query", "key"])),
    }
    merged = MergedModel(load_experts(str(base), experts), granularity="block")
    random_table(merged, 1)
    with torch.no_grad():
        params = merged.merged_params()
    out, _ = export_lora(merged, params, str(base), tmp_path / "adapter", {"method": "x", "experts": experts})
    inputs = batch(0)
    backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(base), out).eval()
    skeleton = merged.skeleton(0).get_submodule(merged.prefix)
    cut = len(merged.prefix) + 1
    folded = merged.dense_params(params)  # the reference: LoRA updates folded into the weights
    tensors = {n[cut:]: v for n, v in folded.items()} | {n[cut:]: v for n, v in merged.buffers_.items()}
    with torch.no_grad():
        got = backbone(**inputs).last_hidden_state
        want = functional_call(skeleton, tensors, args=(), kwargs=inputs).last_hidden_state
    assert relative(got, want) < TOL
    for t, task in enumerate(merged.task_names):  # the model card's recipe for a task's classifier
        task_dir = out / "heads" / task
        classifier = AutoModelForSequenceClassification.from_pretrained(
            base, config=AutoConfig.from_pretrained(task_dir)
        )
        adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(base), out).merge_and_unload()
        setattr(classifier, classifier.base_model_prefix, adapted)
        classifier.load_state_dict(load_file(task_dir / "head.safetensors"), strict=False)
        with torch.no_grad():
            logits = classifier.eval()(**inputs).logits
            reference = task_logits(merged, t, params, **inputs)
        assert relative(logits, reference) < TOL
    assert "heads/" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def full(lms) -> tuple[MergedModel, dict]:
    merged = MergedModel(load_experts(lms["base"], {"a": lms["full_a"], "b": lms["full_b"]}))
    random_table(merged, 2)
    with torch.no_grad():
        return merged, merged.merged_params()


def test_full_experts_at_a_rank_report_the_svd_error_of_each_matrix(lms, full, tmp_path):
    merged, params = full
    out, note = export_lora(merged, params, lms["base"], tmp_path / "r4", {"method": "x"}, rank=4)
    errors = read_export_info(out)["adapter"]["relative_errors"]
    weights = load_file(out / "adapter_model.safetensors")
    dense = merged.dense_params(params)
    assert len(errors) == 2 * 7  # q k v o gate up down in 2 layers
    for m, error in errors.items():
        delta = dense[f"{m}.weight"] - merged.base[f"{m}.weight"]  # (out, in)
        b, a = (weights[f"base_model.model.{m}.lora_{x}.weight"] for x in ("B", "A"))
        assert a.shape[0] == 4
        independent = ((delta - b @ a).norm() / delta.norm()).item()
        singular = torch.linalg.svdvals(delta.double())
        optimal = (singular[4:].square().sum() / singular.square().sum()).sqrt().item()
        assert error == pytest.approx(independent, rel=1e-4) and error == pytest.approx(optimal, rel=1e-4)
        assert 0.05 < error < 1
    assert (
        f"max {max(errors.values()):.3g}" in note
        and "## Compression error" in (out / "README.md").read_text()
    )


def test_full_experts_at_full_rank_reproduce_the_merge_with_saved_norms_embeddings_and_biases(
    lms, full, tmp_path
):
    merged, params = full
    out, _ = export_lora(merged, params, lms["base"], tmp_path / "r32", {"method": "x"}, rank=32)
    assert max(read_export_info(out)["adapter"]["relative_errors"].values()) < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["modules_to_save"] and "model.norm" in config["modules_to_save"]
    assert config["ensure_weight_tying"] and config["bias"] == "lora_only"  # tied embeddings; biases moved
    peft = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(lms["base"]), out).eval()
    want = merged_lm_logits(merged, params)
    assert relative(lm_logits(peft), want) < TOL
    assert relative(lm_logits(peft.merge_and_unload()), want) < TOL  # a plain model, as users fold it


def test_truncated_svd_at_full_rank_is_exact_and_the_factored_svd_agrees():
    g = torch.Generator().manual_seed(0)
    update = torch.randn(6, 9, generator=g)
    a, b, error = truncated(update, 6)
    assert error < 1e-7 and torch.allclose(b @ a, update, atol=1e-5)
    a, b, error = truncated(update, 2)
    assert a.shape == (2, 9) and b.shape == (6, 2) and 0.1 < error < 1
    low_a, low_b = torch.randn(5, 9, generator=g), torch.randn(6, 5, generator=g)  # rank 5
    for rank in (2, 5):
        a, b, error = truncated(low_b @ low_a, rank)
        fa, fb, factored = truncated_factors(low_a, low_b, rank)
        assert factored == pytest.approx(error, rel=1e-4, abs=1e-6)
        torch.testing.assert_close(fb @ fa, b @ a, atol=1e-4, rtol=1e-4)
    assert factored < 1e-6


def test_bad_ranks_are_refused_with_nothing_written(lms, full, tmp_path):
    merged, params = full
    with pytest.raises(DivMergeError, match=r"not low-rank.*pass --lora_rank"):
        export_lora(merged, params, lms["base"], tmp_path / "a", {})
    with pytest.raises(DivMergeError, match=r"--lora_rank 33 is above the size of .*between 1 and 32"):
        export_lora(merged, params, lms["base"], tmp_path / "a", {}, rank=33)
    with pytest.raises(DivMergeError, match=r"--lora_rank must be a positive integer, not 0"):
        export_lora(merged, params, lms["base"], tmp_path / "a", {}, rank=0)
    assert list(tmp_path.iterdir()) == []


def test_a_start_from_merge_of_lora_experts_counts_in_the_delta(lms, tmp_path):
    experts = load_experts(lms["base"], {"a": lms["lora_a"], "b": lms["lora_b"]})
    merger = Merger.from_expert_set(experts, granularity="layer", start_from="ties")
    merged, params = merger.build(), merger.learned_params()  # step 0: the static TIES merge, dense
    with pytest.raises(DivMergeError, match=r"q_proj.weight changes densely.*start_from.*--lora_rank"):
        export_lora(merged, params, lms["base"], tmp_path / "exact", {})
    out, _ = export_lora(merged, params, lms["base"], tmp_path / "r32", {}, rank=32)  # full rank
    peft = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(lms["base"]), out).eval()
    assert relative(lm_logits(peft), merged_lm_logits(merged, params)) < TOL


def test_an_extended_vocabulary_is_refused(lms, tmp_path):
    from tests.test_vocab import extend

    extended = extend(lms["full_a"], tmp_path / "extended", ["<x1>"])
    merged = MergedModel(load_experts(lms["base"], {"a": extended, "b": lms["full_b"]}))
    with torch.no_grad():
        params = merged.merged_params()
    with pytest.raises(DivMergeError, match=r"embed_tokens.weight has shape.*cannot resize.*--format hf"):
        export_lora(merged, params, lms["base"], tmp_path / "out", {}, rank=4)
    assert not (tmp_path / "out").exists()


def test_cli_lora_format_lines_and_the_hf_default(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny)
    static = ["export", "--config", config, "--model.method", "ties", "--format", "lora"]
    expect_error(capsys, [*static, "--out_dir", str(tmp_path / "a")], "pass --lora_rank r")
    expect_error(capsys, [*static, "--out_dir", str(tmp_path / "b"), "--lora_rank", "0"], "positive integer")
    expect_error(capsys, [*static, "--out_dir", str(tmp_path / "c"), "--lora_rank", "17"], "between 1 and 16")
    hf = ["export", "--config", config, "--model.method", "ties", "--lora_rank", "4"]
    expect_error(capsys, [*hf, "--out_dir", str(tmp_path / "d")], "applies to --format lora")
    assert not any((tmp_path / x).exists() for x in "abcd")
    train.main([*static, "--out_dir", str(tmp_path / "e"), "--lora_rank", "4"])
    printed = capsys.readouterr().out
    assert "LoRA adapter, rank 4" in printed and "relative Frobenius error" in printed
    assert (tmp_path / "e" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "e" / "heads").iterdir()) == ["alpha", "beta"]
    train.main(["export", "--config", config, "--model.method", "ties", "--out_dir", str(tmp_path / "f")])
    assert (tmp_path / "f" / "model.safetensors").is_file()  # --format hf, the default
