"""GGUF sources: the packaged SmolLM2 GGUF converted once into the cache, reused, and bad input."""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import divmerge.zoo  # noqa: F401  (registers zoo:)
from divmerge.errors import DivMergeError
from divmerge.experts import gguf
from divmerge.experts.sources import resolve_source
from divmerge.families import causal_lm
from divmerge.families.causal_lm import chat_prompts
from divmerge.zoo import smollm2_gguf_file

MESSAGES = [{"role": "user", "content": 'Is "A gorgeous, witty, seductive movie." positive or negative?'}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache directory of this module's own (DIVMERGE_CACHE), so ~/.cache is never read or written."""
    path = tmp_path_factory.mktemp("gguf_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIVMERGE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def converted(cache):
    """The module's one conversion (through resolve_source), keeping the GGUF-loaded model and tokenizer."""
    loaded = {}
    real = gguf._load

    def spy(file):
        loaded["model"], loaded["tokenizer"] = real(file)
        return loaded["model"], loaded["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "_load", spy)
        start = time.perf_counter()
        path = Path(resolve_source(str(smollm2_gguf_file())))
        seconds = time.perf_counter() - start
    print(f"GGUF conversion: {seconds:.1f} s")
    return {"path": path, "seconds": seconds, **loaded}


def one_line_error(call, *args, match: str) -> str:
    with pytest.raises(DivMergeError, match=match) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_gguf(path: Path, architecture: str) -> Path:
    """A tiny valid GGUF file of the given architecture, one small tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------- the real conversion


def test_converted_directory_is_a_plain_hf_model(converted, cache):
    path = converted["path"]
    assert path.parent == cache / "gguf"
    assert path.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        gguf.GGUF_META_FILE,
    ):
        assert (path / name).is_file(), name
    assert "quantization_config" not in (path / "config.json").read_text()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_converted_logits_equal_the_gguf_model(converted):
    model = AutoModelForCausalLM.from_pretrained(converted["path"], dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    reference = converted["model"].eval()
    batch = converted["tokenizer"]("A gorgeous, witty, seductive movie.", return_tensors="pt")
    with torch.inference_mode():
        ours, theirs = model.eval()(**batch).logits, reference(**batch).logits
    assert ours.shape == (1, batch["input_ids"].shape[1], 49152)
    assert (ours - theirs).abs().max() < 1e-5


def test_converted_tokenizer_keeps_chat_template_and_eos(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted["path"])
    reference = converted["tokenizer"]
    assert tokenizer.eos_token == reference.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == reference.chat_template
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n" in text and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert ids == reference(text)["input_ids"]
    assert tokenizer.eos_token_id in ids
    assert tokenizer.decode(ids) == text


def test_second_resolve_reuses_the_conversion(converted, monkeypatch):
    path = converted["path"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def fail(file):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "_load", fail)
    assert resolve_source(str(smollm2_gguf_file())) == str(path)
    assert resolve_source(str(smollm2_gguf_file().parent)) == str(path)  # folder holding one .gguf file
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_zoo_smollm2_resolves_to_the_conversion(converted, monkeypatch):
    monkeypatch.setattr(gguf, "_load", None)  # a second conversion would fail
    assert resolve_source("zoo:smollm2") == str(converted["path"])
    assert resolve_source("zoo:smollm2", build=True) == str(converted["path"])


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_gguf_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    message = one_line_error(resolve_source, str(smollm2_gguf_file()), match="pip install gguf")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert not (tmp_path / "cache" / "gguf").exists() or not os.listdir(tmp_path / "cache" / "gguf")


def test_not_a_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVMERGE_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    one_line_error(resolve_source, str(fake), match="is not a GGUF file")
    one_line_error(resolve_source, str(tmp_path / "missing.gguf"), match="does not exist")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    one_line_error(resolve_source, str(tmp_path), match="holds 2 GGUF files")
    assert not (tmp_path / "cache").exists()


def test_truncated_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVMERGE_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "cut.gguf"
    with smollm2_gguf_file().open("rb") as f:
        file.write_bytes(f.read(100_000))  # cut in the metadata
    one_line_error(resolve_source, str(file), match="truncated or corrupt")
    assert os.listdir(tmp_path / "cache" / "gguf") == []


def test_unsupported_architecture_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVMERGE_CACHE", str(tmp_path / "cache"))
    file = write_gguf(tmp_path / "odd.gguf", "notanarch")
    message = one_line_error(resolve_source, str(file), match="cannot load the GGUF file")
    assert "'notanarch'" in message
    assert os.listdir(tmp_path / "cache" / "gguf") == []


def test_interrupted_conversion_is_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVMERGE_CACHE", str(tmp_path / "cache"))
    file = write_gguf(tmp_path / "tiny.gguf", "llama")

    def crash(src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_write", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_source(str(file))
    assert os.listdir(tmp_path / "cache" / "gguf") == []
    final = gguf.gguf_dir(file, tmp_path / "cache")
    final.mkdir()
    (final / "config.json").write_text("{}")
    one_line_error(resolve_source, str(file), match="not a complete GGUF conversion")


def test_chat_template_prompts_on_the_real_smollm2_tokenizer(converted):
    """A generative task with chat_template: true asks SmolLM2 as its chat template says."""
    tokenizer = AutoTokenizer.from_pretrained(converted["path"])
    prompt = 'Is "A gorgeous, witty, seductive movie." positive or negative?'
    (ids,) = chat_prompts(tokenizer, "rt", [prompt])
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        f"{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------- a real generative merge, tiny


def _perturbed_expert(path: Path, out: Path, seed: int) -> str:
    """SmolLM2 with its MLP weights moved at random: a stand-in expert whose answers differ from the base."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


@pytest.mark.e2e
def test_generative_fit_on_real_smollm2_lowers_the_divergence_and_exports(converted, tmp_path, capsys):
    """Two SmolLM2 experts, two generative demo tasks through the chat template: fit, and the JS falls;
    the export is a plain causal LM that generates the merged model's greedy answers."""
    import pandas as pd
    import yaml

    import train
    from tests.tiny import cpu_trainer

    base = converted["path"]
    experts = {t: _perturbed_expert(base, tmp_path / t, s) for s, t in enumerate(("rt", "sms_spam"))}
    question = {"rt": "Is this movie review positive or negative?", "sms_spam": "Is this SMS spam or ham?"}
    config = {
        "seed_everything": 0,
        "trainer": cpu_trainer(tmp_path / "run", epochs=3, checkpoints=True),
        "model": {
            "base": str(base),
            "experts": experts,
            "cache_dir": str(tmp_path / "cache"),
            "lr_schedule": "constant",
            "max_new_tokens": 3,
            "teacher_top_k": 20,
        },
        "data": {
            "tasks": [
                {
                    "name": t,
                    "source": f"zoo:{t}",
                    "kind": "generative",
                    "prompt_template": "{text}\n" + question[t] + " Answer in one word.",
                    "answer_column": "answer",
                    "chat_template": True,
                    "num_unlabelled": 4,
                    "num_val": 0,
                    "num_test": 2,
                }
                for t in experts
            ],
            "batch_size_per_task": 2,
            "eval_batch_size": 2,
            "max_length": 96,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = train.main(["fit", "--config", str(path)])
    out = capsys.readouterr()
    assert "| ANP" in out.out + out.err
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    loss = metrics.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].mean()
    print(loss.tolist())
    assert len(loss) == 3 and loss.iloc[-1] < loss.iloc[0]

    merged, exported = cli.model.merged, tmp_path / "export"
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    train.main(["export", "--config", str(path), "--ckpt_path", str(ckpt), "--out_dir", str(exported)])
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    prompts = [torch.tensor(ids) for ids in cli.datamodule.dataset("rt", "test").encodings]
    eos = tokenizer.eos_token_id
    ours = causal_lm.generate(merged, merged.merged_params(), prompts, eos, eos, max_new_tokens=6)
    for i, prompt in enumerate(prompts):  # one by one: no padding on the reference side
        theirs = model.generate(
            prompt[None], max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )[0, len(prompt) :]
        assert ours.tokens[i, : ours.lengths[i]].tolist() == theirs.tolist(), i


def test_a_smollm2_expert_with_one_added_token_merges(converted, tmp_path):
    """Real SmolLM2: an expert that added one token beside one that did not; one-hot coefficients give
    the extended expert's logits over the whole vocabulary, added token included."""
    from divmerge.core.merged_model import MergedModel
    from divmerge.families import load_experts

    base = converted["path"]
    plain = _perturbed_expert(base, tmp_path / "plain", 0)
    extended = _perturbed_expert(base, tmp_path / "extended", 1)
    tokenizer = AutoTokenizer.from_pretrained(extended)
    tokenizer.add_tokens(["<|divmerge_test|>"])
    model = AutoModelForCausalLM.from_pretrained(extended, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))  # 49,153 rows, the new one at the mean
    model.save_pretrained(extended)
    tokenizer.save_pretrained(extended)
    experts = load_experts(str(base), {"plain": plain, "extended": extended})
    assert experts.num_labels == [49_153, 49_153]
    merged = MergedModel(experts)
    ids = torch.tensor([tokenizer("The movie was", add_special_tokens=False)["input_ids"] + [49_152]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = causal_lm.forward(merged, merged.merged_params(merged.one_hot_table(1)), ids, mask).logits
        theirs = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert ours.shape[-1] == 49_153
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
