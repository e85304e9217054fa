"""Generative demo experts (divmerge.zoo.gen_experts): the fine-tuning recipe on a tiny random causal LM
standing in for SmolLM2, on the real demo data."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from divmerge.errors import DivMergeError
from divmerge.zoo import EXPERT_META_FILE, GEN_LORA_RECIPE, GEN_RECIPE, gen_expert
from divmerge.zoo import gen_experts as ge
from tests import tiny_lm

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
RECIPE = replace(GEN_RECIPE, num_train=16, max_length=24, lr=3e-3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tiny_lm.make_base(tmp_path_factory.mktemp("gen_base") / "base")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def built(base, tmp_path_factory):
    cache = tmp_path_factory.mktemp("gen_cache")
    return cache, ge.build_gen_expert("sms_spam", RECIPE, cache, base, progress=False)


def test_names_map_to_task_and_recipe():
    assert gen_expert("rt") == ("rt", GEN_RECIPE)
    assert gen_expert("lora/bbc_headline") == ("bbc_headline", GEN_LORA_RECIPE)
    with pytest.raises(DivMergeError, match=r"zoo:smollm2/<task>.*among: rt, sms_spam"):
        gen_expert("lora/nope")


def test_answer_loss_is_the_answer_tokens_cross_entropy(base):
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    rows = [([5, 6, 7, 8], [20, 21, 1]), ([9, 10], [22, 1])]
    loss = ge.answer_loss(model, rows, pad_id=0)
    reference = []
    for prompt, answer in rows:  # one by one, no padding, logits at every position
        ids = torch.tensor([prompt + answer[:-1]])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 :]
        reference.append(F.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
    torch.testing.assert_close(loss, torch.stack(reference).sum() / 5, atol=1e-5, rtol=1e-5)


def test_a_built_expert_learned_its_answers_and_is_cached(built, base, monkeypatch):
    cache, path = built
    meta = json.loads((path / EXPERT_META_FILE).read_text())
    assert meta["task"] == "sms_spam" and meta["steps"] == 2 and meta["metric"] == "exact_match"
    assert meta["last_loss"] < meta["first_loss"]
    assert 0.0 <= meta["held_out_score"] <= 1.0 and meta["held_out_rows"] == 64
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not torch.equal(model.lm_head.weight, AutoModelForCausalLM.from_pretrained(base).lm_head.weight)
    assert AutoTokenizer.from_pretrained(path).chat_template == CHAT
    monkeypatch.setattr(ge, "_train", lambda *a: pytest.fail("a cached expert was trained again"))
    assert ge.build_gen_expert("sms_spam", RECIPE, cache, base, progress=False) == path


def test_the_lora_twin_is_a_causal_lm_adapter_over_the_base(built, base):
    cache, full = built
    recipe = replace(GEN_LORA_RECIPE, num_train=8, max_length=24)
    path = ge.build_gen_expert("sms_spam", recipe, cache, base, progress=False)
    assert path != full and path.name.startswith("smollm2-sms_spam-lora-")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert config["base_model_name_or_path"] == str(base)
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_the_headline_expert_is_scored_with_rouge_l(base, tmp_path):
    recipe = replace(RECIPE, num_train=8)
    path = ge.build_gen_expert("bbc_headline", recipe, tmp_path, base, progress=False)
    assert json.loads((path / EXPERT_META_FILE).read_text())["metric"] == "rougeL_f"


def test_too_few_training_rows_is_one_clear_error(base, tmp_path):
    with pytest.raises(DivMergeError, match="fewer than the recipe's num_train=5000; lower num_train"):
        ge.build_gen_expert("rt", replace(RECIPE, num_train=5000), tmp_path, base, progress=False)
    assert not list((tmp_path / "zoo").iterdir())  # nothing half-written
