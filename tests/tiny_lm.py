"""Tiny random causal LMs for fast tests: a small byte-level BPE tokenizer, a 2-layer Qwen2 base, and
experts made by a few fine-tuning steps on synthetic generative tasks (CSVs with ``words`` and ``answer``).

The tokenizer is byte-level BPE because AutoTokenizer loads a Qwen2 directory's tokenizer.json as a
Qwen2Tokenizer (byte-level BPE pipeline, the file's vocabulary and merges).
"""

import random
from pathlib import Path

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

LETTERS = list("abcdefgh")
TEMPLATE = "{words} then"
PAD_ID, EOS_ID = 0, 1


def tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer for the synthetic tasks (without an EOS token when ``eos`` is False)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join([*LETTERS, "yes", "no", "then"])] * 10, trainer)
    special = {"eos_token": "<eos>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", **special)


def vocab_size() -> int:
    return len(tokenizer())


def config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )


def answer(task: str, words: list[str]) -> str:
    """The synthetic tasks: ``first`` copies the first word, ``has_a`` says whether an ``a`` occurs."""
    return words[0] if task == "first" else ("yes" if "a" in words else "no")


def make_csv(path: Path, task: str, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = [[rng.choice(LETTERS) for _ in range(rng.randint(2, 5))] for _ in range(rows)]
    pd.DataFrame({"words": [" ".join(w) for w in words], "answer": [answer(task, w) for w in words]}).to_csv(
        path, index=False
    )
    return path


def make_base(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config()).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def fine_tune(
    base: Path, path: Path, csv: Path, steps: int = 80, seed: int = 0, lora: LoraConfig | None = None
) -> Path:
    """A causal-LM expert: ``steps`` Adam steps on prompt + answer + EOS (loss on the answer tokens).

    With ``lora``, only a peft LoRA adapter is trained (higher learning rate) and ``path`` holds the adapter.
    """
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)  # as divmerge will load it
    model = Qwen2ForCausalLM.from_pretrained(base)
    if lora is not None:
        model = get_peft_model(model, lora)
    table = pd.read_csv(csv)
    prompts = [tok(TEMPLATE.format(words=w))["input_ids"] for w in table["words"]]
    answers = [[*tok(str(a))["input_ids"], tok.eos_token_id] for a in table["answer"]]
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=3e-3 if lora is None else 2e-2)
    for step in range(steps):
        rows = [(step * 16 + i) % len(prompts) for i in range(16)]
        seqs = [prompts[r] + answers[r] for r in rows]
        length = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
        labels = torch.tensor(
            [
                [-100] * len(prompts[r]) + answers[r] + [-100] * (length - len(s))
                for r, s in zip(rows, seqs, strict=True)
            ]
        )
        mask = (labels != -100) | (
            torch.arange(length) < torch.tensor([len(prompts[r]) for r in rows])[:, None]
        )
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_setup(root: Path, tasks: tuple[str, ...] = ("first", "has_a"), rows: int = 60) -> dict:
    """Base, one fine-tuned expert per task and a CSV per task."""
    base = make_base(root / "base")
    experts, data = {}, {}
    for i, task in enumerate(tasks):
        data[task] = str(make_csv(root / f"{task}.csv", task, rows, seed=i))
        experts[task] = str(fine_tune(base, root / f"expert_{task}", Path(data[task]), seed=i))
    return {"base": str(base), "experts": experts, "data": data, "cache": str(root / "cache")}
