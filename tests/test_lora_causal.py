"""peft LoRA adapters over a causal-LM base: one-hot reproduction, generation, fit, export, bad input."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import Qwen2ForCausalLM

import train
from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.families import causal_lm, load_experts
from tests import tiny_lm
from tests.test_generative import PROMPTS, prompts, write_config

TARGETS = ["q_proj", "v_proj", "up_proj"]
LORA = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=TARGETS)


def make_lora_lm(base: Path, path: Path, seed: int, **lora_options: object) -> Path:
    """A LoRA adapter (CAUSAL_LM unless ``task_type`` says otherwise) over ``base``, random non-zero A, B."""
    torch.manual_seed(seed)
    options = {"task_type": TaskType.CAUSAL_LM, "r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    model = get_peft_model(Qwen2ForCausalLM.from_pretrained(base), LoraConfig(**options | lora_options))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def peft_model(base: str, adapter: str) -> PeftModel:
    return PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), adapter).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny Qwen2 base, a full fine-tune (task first), a LoRA adapter trained on has_a, a random DoRA."""
    root = tmp_path_factory.mktemp("lora_lm")
    base = tiny_lm.make_base(root / "base")
    data = {
        task: str(tiny_lm.make_csv(root / f"{task}.csv", task, 60, seed=i))
        for i, task in enumerate(["first", "has_a"])
    }
    return {
        "base": str(base),
        "full": str(tiny_lm.fine_tune(base, root / "full", Path(data["first"]), steps=40)),
        "plain": str(tiny_lm.fine_tune(base, root / "plain", Path(data["has_a"]), seed=1, lora=LORA)),
        "dora": str(
            make_lora_lm(base, root / "dora", seed=2, target_modules=["q_proj", "v_proj"], use_dora=True)
        ),
        "data": data,
        "root": root,
    }


@pytest.fixture(scope="module")
def merged(setup) -> MergedModel:
    experts = {"first": setup["full"], "plain": setup["plain"], "dora": setup["dora"]}
    return MergedModel(load_experts(setup["base"], experts), granularity="layer")


def test_plain_lora_stays_factored_and_dora_is_densified(merged):
    assert merged.task_names == ["first", "plain", "dora"]
    q, up = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"
    assert set(merged.lora_task[up].tolist()) == {1}  # plain LoRA: factors, no dense row
    assert merged.dense_rows[f"{up}.weight"] == [0]
    assert set(merged.lora_task[q].tolist()) == {1}
    assert merged.dense_rows[f"{q}.weight"] == [0, 2]  # DoRA densified into a task-vector row


@pytest.mark.parametrize(("task", "kind"), [(1, "plain"), (2, "dora")])
def test_one_hot_adapter_reproduces_peft_model(setup, merged, task, kind):
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=tiny_lm.PAD_ID)  # (B, L), right-padded
    with torch.no_grad():
        ours = causal_lm.forward(merged, merged.merged_params(merged.one_hot_table(task)), ids, mask).logits
        theirs = peft_model(setup["base"], setup[kind])(input_ids=ids, attention_mask=mask).logits
        base = causal_lm.forward(merged, merged.merged_params(merged.base_table()), ids, mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-5
    assert (base[real] - theirs[real]).abs().max() > 1e-2  # the adapter does change the model


def test_greedy_generation_of_the_one_hot_merge_equals_peft_model(setup):
    merged = MergedModel(load_experts(setup["base"], {"plain": setup["plain"]}))  # adapters only
    assert merged.lora_a and not any(merged.task_vectors[n].shape[0] for n in merged.names)
    params = merged.merged_params(merged.one_hot_table(0))
    decoded = causal_lm.generate(
        merged, params, prompts(PROMPTS), tiny_lm.EOS_ID, tiny_lm.PAD_ID, max_new_tokens=6
    )
    model = peft_model(setup["base"], setup["plain"])
    for prompt, tokens, length in zip(prompts(PROMPTS), decoded.tokens, decoded.lengths, strict=True):
        out = model.generate(
            input_ids=prompt[None],
            attention_mask=torch.ones_like(prompt)[None],
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tiny_lm.EOS_ID,
            pad_token_id=tiny_lm.PAD_ID,
        )
        assert tokens[:length].tolist() == out[0, len(prompt) :].tolist()
    answers = causal_lm.decode_answers(tiny_lm.tokenizer(), decoded.tokens, decoded.lengths)
    assert answers == ["yes", "no", "no", "yes"]  # the adapter learned has_a, and stops at EOS


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_on_a_full_expert_and_an_adapter_then_export_folds_the_adapter(
    setup, tmp_path, capsys, precision
):
    lm = {"base": setup["base"], "experts": {"first": setup["full"], "has_a": setup["plain"]}}
    config = write_config(tmp_path, lm | {"data": setup["data"]}, epochs=2)
    cli = train.main(["fit", "--config", config, "--trainer.precision", precision])
    assert "| ANP" in "".join(capsys.readouterr())
    merged = cli.model.merged
    table = merged.coefficients().detach()  # (T, G)
    adapter = torch.stack([merged.coefficients.column(table, f"{m}.weight")[1] for m in merged.lora_b])
    assert (adapter - 0.5).abs().max() > 1e-3  # the adapter's LoRA coefficients moved from 1/T
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    out = tmp_path / "out"
    train.main(["export", "--config", config, "--ckpt_path", str(ckpt), "--out_dir", str(out)])
    model = Qwen2ForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=tiny_lm.PAD_ID)
    with torch.no_grad():
        ours = causal_lm.forward(merged, merged.merged_params(), ids, mask).logits
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max() < 1e-5
    assert json.loads((out / "divmerge_export.json").read_text())["kind"] == "causal_lm"
    capsys.readouterr()
    train.main(["test", "--config", config, "--model.method", "task_arithmetic"])  # LoRA densified
    assert "| ANP" in "".join(capsys.readouterr())


def test_adapter_without_task_type_next_to_a_causal_lm_expert_merges_exactly(setup):
    adapter = str(make_lora_lm(setup["base"], setup["root"] / "untyped", seed=5, task_type=None))
    merged = MergedModel(load_experts(setup["base"], {"first": setup["full"], "x": adapter}))
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=tiny_lm.PAD_ID)
    with torch.no_grad():
        ours = causal_lm.forward(merged, merged.merged_params(merged.one_hot_table(1)), ids, mask).logits
        theirs = peft_model(setup["base"], adapter)(input_ids=ids, attention_mask=mask).logits
    assert merged.lora_a and (ours[mask.bool()] - theirs[mask.bool()]).abs().max() < 1e-5


def test_adapter_that_does_not_fit_the_base_is_refused(setup):
    config = tiny_lm.config()
    config.intermediate_size = 48
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(setup["root"] / "narrow_base")
    adapter = make_lora_lm(setup["root"] / "narrow_base", setup["root"] / "narrow_adapter", seed=3)
    config_file = adapter / "adapter_config.json"  # recorded base not available here (a hub id)
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": "org/narrow"})
    )
    with pytest.raises(
        DivMergeError, match=r"does not fit the configured base.*size mismatch.*set model.base"
    ):
        load_experts(setup["base"], {"first": setup["full"], "narrow": str(adapter)})


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_lora_on_a_tied_embedding_is_refused(setup, module):
    adapter = make_lora_lm(setup["base"], setup["root"] / module, seed=4, target_modules=[module, "q_proj"])
    with pytest.raises(
        DivMergeError, match=rf"{module}'.*tied to .*cannot be merged exactly.*target_modules"
    ):
        load_experts(setup["base"], {"tied": str(adapter)})


def test_causal_lm_adapter_among_classifiers_is_refused(setup, tiny):
    with pytest.raises(DivMergeError, match=r"'alpha' is not a causal LM"):
        load_experts(setup["base"], {"plain": setup["plain"], "alpha": tiny["experts"]["alpha"]})


def test_classifier_adapter_among_causal_lm_experts_is_refused(setup):
    adapter = make_lora_lm(setup["base"], setup["root"] / "seq_cls", seed=6, task_type=TaskType.SEQ_CLS)
    with pytest.raises(DivMergeError, match=r"is a SEQ_CLS adapter but the experts are merged as CAUSAL_LM"):
        load_experts(setup["base"], {"first": setup["full"], "seq_cls": str(adapter)})
