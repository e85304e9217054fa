"""``export --format gguf``: a GGUF file transformers reads back with the merge's answers; bad input."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import train
from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.export import gguf_file
from divmerge.export.gguf_file import GGUF_FILE, check_gguf, export_gguf
from divmerge.families import load_experts
from tests import tiny_lm
from tests.test_cli import write_config as write_classifier_config
from tests.test_generative import write_config

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["a b c", "d e", "h g f e", "b a", "c a h", "a"]
MESSAGES = [{"role": "user", "content": "a b then"}]


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=tiny_lm.PAD_ID)
    return out[0, len(ids) :].tolist()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, lm) -> dict:
    """The tiny Qwen2 merge (static task arithmetic) exported as Hugging Face and as GGUF f32/f16/q8_0;
    its base tokenizer carries a ChatML chat template."""
    root = tmp_path_factory.mktemp("gguf_export")
    base = root / "base"
    shutil.copytree(lm["base"], base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHATML
    tok.save_pretrained(base)
    config = write_config(root, {**lm, "base": str(base)}, epochs=1)
    args = ["export", "--config", config, "--model.method", "task_arithmetic"]
    out = {"root": root, "config": config, "args": args, "base": base}
    train.main([*args, "--out_dir", str(root / "hf")])
    for kind in ("f32", "f16", "bf16", "q8_0"):
        train.main([*args, "--out_dir", str(root / kind), "--format", "gguf", "--gguf_type", kind])
    return out


@pytest.fixture(scope="module")
def reference(qwen):
    model = AutoModelForCausalLM.from_pretrained(qwen["root"] / "hf", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(qwen["root"] / "hf")


def load_gguf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)


def compare(path: Path, reference) -> tuple[float, int]:
    """(largest logit difference, answers equal to the Hugging Face export's) over TEXTS."""
    (model, tokenizer), (ref, ref_tokenizer) = load_gguf(path), reference
    worst, same = 0.0, 0
    for text in TEXTS:
        prompt = tiny_lm.TEMPLATE.format(words=text)
        ids = ref_tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt)["input_ids"] == ids  # the file's tokenizer encodes as the base's does
        with torch.no_grad():
            ours, theirs = model(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits
        worst = max(worst, (ours - theirs).abs().max().item())
        same += greedy(model, ids) == greedy(ref, ids)
    return worst, same


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("kind, tolerance", [("f32", 1e-5), ("f16", 5e-3)])
def test_gguf_read_back_by_transformers_answers_like_the_hf_export(qwen, reference, kind, tolerance):
    worst, same = compare(qwen["root"] / kind, reference)
    print(f"{kind}: max |logit diff| {worst:.2e}, {same}/{len(TEXTS)} greedy answers equal")
    assert same == len(TEXTS)
    assert worst < tolerance
    model, _ = load_gguf(qwen["root"] / kind)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings


@pytest.mark.parametrize("kind", ["q8_0", "bf16"])
def test_q8_0_and_bf16_load_and_their_difference_is_measured(qwen, reference, kind):
    reader = GGUFReader(qwen["root"] / kind / GGUF_FILE)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == kind.upper()
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q.bias"] == "F32"
    worst, same = compare(qwen["root"] / kind, reference)
    print(f"{kind}: max |logit diff| {worst:.2e}, {same}/{len(TEXTS)} greedy answers equal")
    assert 0 < worst < 0.1  # rounded (not a float copy), and close
    assert same == len(TEXTS)
    sizes = {k: (qwen["root"] / k / GGUF_FILE).stat().st_size for k in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_tokenizer_and_chat_template_are_in_the_metadata(qwen):
    out = qwen["root"] / "f16"
    reader = GGUFReader(out / GGUF_FILE)
    base = AutoTokenizer.from_pretrained(qwen["base"])
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"  # AutoTokenizer reads the base as a Qwen2Tokenizer
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tiny_lm.vocab_size() and tokens[tiny_lm.EOS_ID] == "<eos>"
    assert field(reader, "tokenizer.ggml.token_type")[tiny_lm.EOS_ID] == 3  # control
    assert field(reader, "tokenizer.ggml.eos_token_id") == tiny_lm.EOS_ID
    assert field(reader, "tokenizer.ggml.padding_token_id") == tiny_lm.PAD_ID
    merges = json.loads(base.backend_tokenizer.to_str())["model"]["merges"]  # [[left, right], ...]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert field(reader, "tokenizer.chat_template") == CHATML
    assert field(reader, "qwen2.block_count") == 2 and field(reader, "qwen2.attention.head_count_kv") == 1
    _, tokenizer = load_gguf(out)
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<eos>"
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == base.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (out / "Modelfile").read_text().startswith("# ollama create")
    assert f"FROM ./{GGUF_FILE}" in (out / "Modelfile").read_text()
    assert "llama-cli -m" in (out / "README.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "README.md",
        "divmerge_export.json",
        GGUF_FILE,
    ]


# -------------------------------------------------------------------------- llama: q/k permutation, head


def smollm_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE splitting digits first, as SmolLM2's tokenizer does (llama.cpp's "smollm")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join([*tiny_lm.LETTERS, "yes", "no", "then"])] * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )


def test_llama_round_trip_permutes_q_and_k_and_keeps_an_untied_head(tmp_path):
    """A SmolLM2-shaped Llama (grouped-query attention, untied head): f32 logits equal the merge's."""
    tokenizer = smollm_tokenizer()
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 3,  # rows beyond the tokenizer: [PAD<i>] tokens
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=20_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    paths = {}
    for name in ("base", "one", "two"):
        model = LlamaForCausalLM(config)
        if name != "base":  # an expert: the base moved at random
            model.load_state_dict(LlamaForCausalLM.from_pretrained(paths["base"]).state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    experts = {"one": str(paths["one"]), "two": str(paths["two"])}
    merged = MergedModel(load_experts(str(paths["base"]), experts))
    with torch.no_grad():
        params = merged.merged_params()  # the initial coefficients
    export_gguf(merged, params, str(paths["base"]), tmp_path / "out", {"experts": experts}, gguf_type="f32")
    reader = GGUFReader(tmp_path / "out" / GGUF_FILE)
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    assert field(reader, "llama.rope.freq_base") == 20_000.0
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" in names  # untied head
    q_file = np.asarray(names["blk.0.attn_q.weight"].data)
    q_merged = params["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert q_file.shape == q_merged.shape and not np.array_equal(q_file, q_merged)  # rows permuted
    assert np.array_equal(np.sort(q_file, axis=None), np.sort(q_merged, axis=None))

    model, read_tokenizer = load_gguf(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict(merged.dense_params(params), strict=False)
    prompt = "a b c then"
    ids = tokenizer(prompt)["input_ids"]
    assert read_tokenizer(prompt)["input_ids"] == ids
    assert read_tokenizer.chat_template == CHATML and read_tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])).logits, reference(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- bad input


def refused(capsys, argv: list[str], match: str) -> str:
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    return err[0]


def test_unknown_gguf_type_and_format_are_refused_before_loading(qwen, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, [*qwen["args"], "--out_dir", str(out), "--format", "gguf", "--gguf_type", "q4_k"], "q4_k")
    refused(capsys, [*qwen["args"], "--out_dir", str(out), "--format", "onnx"], "--format 'onnx' is unknown")
    assert not out.exists() and leftovers(tmp_path) == []


def test_classification_merge_and_unknown_architecture_are_refused(tiny, tmp_path, capsys):
    config = write_classifier_config(tmp_path, tiny)
    out = tmp_path / "out"
    args = ["export", "--config", config, "--model.method", "task_arithmetic", "--out_dir", str(out)]
    line = refused(capsys, [*args, "--format", "gguf"], "GGUF export writes causal LMs")
    assert "'bert'" in line and "--format hf" in line
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    with pytest.raises(DivMergeError, match="not 'gpt2'"):
        check_gguf(None, str(gpt2), "f16")
    qwen_base = tiny_lm_base(tmp_path)
    with pytest.raises(DivMergeError, match="this is a classification merge"):
        check_gguf("classification", qwen_base, "f16")
    llama = tmp_path / "llama"  # a llama base whose tokenizer is WordPiece
    LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(llama)
    AutoTokenizer.from_pretrained(tiny["base"]).save_pretrained(llama)
    with pytest.raises(DivMergeError, match="BertTokenizer is not one"):
        check_gguf(None, str(llama), "f16")
    assert not out.exists() and leftovers(tmp_path) == []


def tiny_lm_base(tmp_path: Path) -> str:
    path = tmp_path / "qwen_config"
    tiny_lm.config().save_pretrained(path)
    return str(path)


def test_a_failure_while_writing_leaves_nothing(qwen, tmp_path, monkeypatch, capsys):
    calls = []

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args)

    real = gguf_file._convert
    monkeypatch.setattr(gguf_file, "_convert", fail_on_third)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        train.main([*qwen["args"], "--out_dir", str(out), "--format", "gguf"])
    assert len(calls) == 3 and not out.exists() and os.listdir(tmp_path) == []
