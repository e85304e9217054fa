"""Generative (causal-LM) experts: coarsened divergences, answer masking, teacher cache, generation, fit."""

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoTokenizer, Qwen2ForCausalLM

import train
from divmerge.core.merged_model import MergedModel
from divmerge.data import TaskSpec, check_task, load_rows
from divmerge.errors import DivMergeError
from divmerge.families import causal_lm, load_experts
from divmerge.families.generation import (
    answer_aligned,
    answer_divergence,
    cache_bytes_per_position,
    coarsen_like,
    coarsen_topk,
    exact_match,
    greedy_decode,
)
from divmerge.lightning.datamodule import MergeDataModule
from divmerge.objectives import OBJECTIVES, js_divergence
from tests import tiny_lm
from tests.tiny import cpu_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def merged(lm) -> MergedModel:
    return MergedModel(load_experts(lm["base"], lm["experts"]), granularity="layer")


def prompts(texts: list[str]) -> list[torch.Tensor]:
    tok = tiny_lm.tokenizer()  # as AutoTokenizer loads it from the base (same ids)
    return [torch.tensor(tok(tiny_lm.TEMPLATE.format(words=t))["input_ids"]) for t in texts]


PROMPTS = ["a b c", "d e", "h g f e", "b a"]


# ------------------------------------------------------------------------------------------- pure math
@pytest.mark.parametrize("name", ["js", "kl"])
def test_top_k_with_k_equal_to_vocab_is_the_full_divergence(name):
    torch.manual_seed(0)
    objective = OBJECTIVES[name]
    teacher = torch.log_softmax(3 * torch.randn(64, 11), dim=-1)  # (N, V)
    student = 3 * torch.randn(64, 11)
    full = objective(teacher, student)
    ids, coarse = coarsen_topk(teacher, 11)
    assert ids is None and torch.equal(coarse, teacher)  # k >= V keeps the full distribution
    for k in (10, 11):  # k = V - 1 leaves one token in the rest bucket; k = V an empty one
        ids = teacher.topk(k, dim=-1).indices
        coarse = objective(coarsen_like(teacher, ids), coarsen_like(torch.log_softmax(student, -1), ids))
        torch.testing.assert_close(coarse, full, atol=1e-5, rtol=1e-5)


def test_coarsened_distributions_are_normalised_and_never_exceed_the_full_divergence():
    torch.manual_seed(1)
    teacher = torch.log_softmax(2 * torch.randn(32, 50), dim=-1)
    student = 2 * torch.randn(32, 50)
    full = js_divergence(teacher, student)
    for k in (1, 5, 20):
        ids, coarse_teacher = coarsen_topk(teacher, k)
        assert ids.shape == (32, k) and coarse_teacher.shape == (32, k + 1)
        torch.testing.assert_close(coarse_teacher.logsumexp(-1), torch.zeros(32), atol=1e-5, rtol=0)
        coarse = js_divergence(coarse_teacher, coarsen_like(torch.log_softmax(student, -1), ids))
        assert (coarse <= full + 1e-6).all()  # data processing inequality


def test_answer_divergence_masks_prompt_and_padding_positions():
    torch.manual_seed(2)
    batch, length, vocab, k = 3, 9, 13, 4
    logits = torch.randn(batch, length, vocab)
    prompt_lengths = torch.tensor([3, 5, 2])
    answer_lengths = torch.tensor([4, 2, 3])  # answer logits: positions m-1 .. m+n-2
    teacher_full = torch.log_softmax(torch.randn(batch, 4, vocab), dim=-1)
    ids, teacher = coarsen_topk(teacher_full, k)
    loss = answer_divergence(js_divergence, logits, prompt_lengths, answer_lengths, teacher, ids)
    answer = torch.zeros(batch, length, dtype=torch.bool)
    for b, (m, n) in enumerate(zip(prompt_lengths.tolist(), answer_lengths.tolist(), strict=True)):
        answer[b, m - 1 : m - 1 + n] = True
    changed = logits.clone()
    changed[~answer] = 50 * torch.randn(int((~answer).sum()), vocab)  # every prompt and padding position
    same = answer_divergence(js_divergence, changed, prompt_lengths, answer_lengths, teacher, ids)
    assert torch.equal(same, loss)
    changed[1, 4, 0] += 5.0  # the logits predicting answer token 0 of example 1
    assert not torch.equal(
        answer_divergence(js_divergence, changed, prompt_lengths, answer_lengths, teacher, ids), loss
    )
    means = []  # per example: mean over its answer positions; then the mean over examples
    for b, (m, n) in enumerate(zip(prompt_lengths.tolist(), answer_lengths.tolist(), strict=True)):
        student = torch.log_softmax(logits[b, m - 1 : m - 1 + n], dim=-1)
        means.append(js_divergence(teacher[b, :n], coarsen_like(student, ids[b, :n])).mean())
    torch.testing.assert_close(loss, torch.stack(means).mean())


def test_greedy_decode_stops_each_example_at_eos_and_pads_after_it():
    script = torch.tensor([[5, 1, 7], [6, 6, 1]])  # example 0 ends at step 1, example 1 at step 2
    steps = []

    def step(previous):
        steps.append(None if previous is None else previous[:, 0].tolist())
        return F.one_hot(script[:, len(steps) - 1], 9).float() * 10  # (B, V) logits

    out = greedy_decode(step, 2, max_new_tokens=5, eos_id=1, pad_id=0, top_k=2, keep_distributions=True)
    assert out.tokens.tolist() == [[5, 1, 0], [6, 6, 1]] and out.lengths.tolist() == [2, 3]
    assert steps == [None, [5, 6], [1, 6]]  # stops once every example has ended
    assert out.ids.shape == (2, 3, 2) and out.logprobs.shape == (2, 3, 3)
    assert out.ids[0, 0, 0] == 5 and out.logprobs.logsumexp(-1).allclose(torch.zeros(2, 3), atol=1e-5)


def test_cache_bytes_per_position():
    assert cache_bytes_per_position(20, 150_000) == 20 * 4 + 21 * 4 + 4
    assert cache_bytes_per_position(None, 150_000) == 150_000 * 4 + 4
    assert cache_bytes_per_position(200_000, 150_000) == cache_bytes_per_position(None, 150_000)


def test_exact_match_strips_whitespace():
    assert exact_match([" yes", "no", "a b"], ["yes ", "yes", "a b"]).tolist() == [1.0, 0.0, 1.0]


# ----------------------------------------------------------------------------------------- the model
def test_causal_lm_experts_merge_every_weight_and_tied_embeddings_once(lm, merged):
    assert merged.prefix == "" and "model.embed_tokens.weight" in merged.names
    assert "lm_head.weight" not in merged.names  # tied to the input embeddings: merged once
    expert = Qwen2ForCausalLM.from_pretrained(lm["experts"]["has_a"]).eval()
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=0)
    params = merged.merged_params(merged.one_hot_table(1))
    ours = causal_lm.forward(merged, params, ids, mask).logits
    theirs = expert(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions differ only by their (unused) position ids
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_generation_matches_hugging_face_greedy_generate(lm, merged):
    expert = Qwen2ForCausalLM.from_pretrained(lm["experts"]["first"]).eval()
    params = merged.merged_params(merged.one_hot_table(0))
    out = causal_lm.generate(merged, params, prompts(PROMPTS), eos_id=1, pad_id=0, max_new_tokens=5)
    for i, prompt in enumerate(prompts(PROMPTS)):  # one by one: no padding on the reference side
        ref = expert.generate(
            prompt[None], max_new_tokens=5, do_sample=False, eos_token_id=1, pad_token_id=0
        )[0, len(prompt) :]
        assert out.tokens[i, : out.lengths[i]].tolist() == ref.tolist()


@pytest.mark.parametrize("top_k", [3, None])
def test_one_hot_coefficients_give_zero_divergence(merged, top_k):
    batch = dict(
        zip(("input_ids", "attention_mask"), causal_lm.pad_sequences(prompts(PROMPTS), 0), strict=True)
    )
    batch["idx"] = torch.arange(len(PROMPTS))
    teacher = causal_lm.build_teacher(merged, 0, [batch], len(PROMPTS), 1, 0, max_new_tokens=4, top_k=top_k)
    assert ("ids" in teacher) == (top_k is not None)
    loss = causal_lm.teacher_forced_loss(
        merged, merged.merged_params(merged.one_hot_table(0)), js_divergence, prompts(PROMPTS), teacher, 0
    )
    assert loss.abs() < 1e-6
    other = causal_lm.teacher_forced_loss(
        merged, merged.merged_params(merged.one_hot_table(1)), js_divergence, prompts(PROMPTS), teacher, 0
    )
    assert other > 1e-3


@pytest.mark.parametrize("mode", ["whole", "per_block"])
def test_joint_pass_equals_one_task_at_a_time(lm, mode):
    """backbone_pass joint: every task's rows in one forward; the losses and the coefficient gradient
    are those of the per-task passes (different padding: float rounding only)."""
    model = MergedModel(load_experts(lm["base"], lm["experts"]), granularity="layer", merge_mode=mode)
    torch.nn.init.uniform_(model.coefficients.weight, 0.2, 0.9)
    batches, teachers = {}, {}
    for t, texts in enumerate((PROMPTS, ["c c", "a b c d e f", "g"])):
        ids, mask = causal_lm.pad_sequences(prompts(texts), 0)
        batches[t] = {"input_ids": ids, "attention_mask": mask, "idx": torch.arange(len(texts))}
        teachers[t] = causal_lm.build_teacher(model, t, [batches[t]], len(texts), 1, 0, 4 + t, top_k=3)
    results = {}
    for backbone_pass in ("per_task", "joint"):
        model.coefficients.weight.grad = None
        loss, per_task = causal_lm.step_loss(
            model, js_divergence, batches, teachers, 0, backbone_pass=backbone_pass
        )
        loss.backward()
        results[backbone_pass] = (loss.detach(), per_task, model.coefficients.weight.grad.clone())
    (la, pa, ga), (lb, pb, gb) = results["per_task"], results["joint"]
    assert la > 1e-3 and ga.abs().sum() > 0
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-4)
    for t in (0, 1):
        torch.testing.assert_close(pa[t], pb[t], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-3)


def test_answer_aligned_puts_every_answer_at_the_end():
    prompts_ = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    answers = [torch.tensor([2, 1]), torch.tensor([3, 4, 1])]  # the last token is predicted, never fed
    ids, mask = answer_aligned(prompts_, answers, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 2, 0], [0, 0, 8, 3, 4]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    ids, mask = answer_aligned(prompts_, [torch.tensor([1]), torch.tensor([1])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]  # one-token answers: only the prompts are fed


def test_teacher_forced_loss_equals_full_logits_on_right_padded_sequences(merged):
    """The LM head on the aligned answer positions only gives the loss of the plain layout."""
    batch = dict(
        zip(("input_ids", "attention_mask"), causal_lm.pad_sequences(prompts(PROMPTS), 0), strict=True)
    )
    batch["idx"] = torch.arange(len(PROMPTS))
    teacher = causal_lm.build_teacher(merged, 0, [batch], len(PROMPTS), 1, 0, max_new_tokens=4, top_k=3)
    teacher["lengths"] = teacher["lengths"] - torch.tensor([0, 1, 0, 1])  # answers of 2 and 1 tokens
    params = merged.merged_params(torch.full_like(merged.one_hot_table(0), 0.4))
    loss = causal_lm.teacher_forced_loss(merged, params, js_divergence, prompts(PROMPTS), teacher, 0)
    lengths = teacher["lengths"]
    seqs = [
        torch.cat([p, a[: n - 1].long()])
        for p, a, n in zip(prompts(PROMPTS), teacher["tokens"], lengths.tolist(), strict=True)
    ]
    ids, mask = causal_lm.pad_sequences(seqs, 0)  # (B, L), right-padded
    logits = causal_lm.forward(merged, params, ids, mask).logits  # (B, L, V): every position
    prompt_lengths = torch.tensor([len(p) for p in prompts(PROMPTS)])
    reference = answer_divergence(
        js_divergence, logits, prompt_lengths, lengths, teacher["logprobs"], teacher["ids"].long()
    )
    assert len(set(lengths.tolist())) > 1 and len(set(prompt_lengths.tolist())) > 1
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-5)


def test_teacher_cache_size_follows_the_formula(merged):
    batch = dict(
        zip(("input_ids", "attention_mask"), causal_lm.pad_sequences(prompts(PROMPTS), 0), strict=True)
    )
    batch["idx"] = torch.arange(len(PROMPTS))
    vocab = tiny_lm.vocab_size()
    for top_k in (3, None):
        teacher = causal_lm.build_teacher(merged, 1, [batch], len(PROMPTS), 1, 0, 4, top_k)
        positions = teacher["tokens"].numel()
        stored = sum(
            teacher[k].numel() * teacher[k].element_size()
            for k in ("tokens", "logprobs", "ids")
            if k in teacher
        )
        assert stored == positions * cache_bytes_per_position(top_k, vocab)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("answer", ["", "  ", None])
def test_empty_answers_are_refused_in_one_line(tmp_path, answer):
    path = tmp_path / "qa.csv"
    pd.DataFrame({"q": ["a", "b", "c"], "answer": ["yes", answer, "no"]}).to_csv(path, index=False)
    spec = TaskSpec(
        name="qa", source=str(path), kind="generative", prompt_template="{q}", answer_column="answer"
    )
    with pytest.raises(
        DivMergeError, match=r"answer_column 'answer' is empty in 1 of 3 rows .* \(first: row 1\)"
    ):
        load_rows(spec)


def test_generative_task_without_prompt_template_is_refused():
    with pytest.raises(DivMergeError, match="is generative but has no prompt_template"):
        MergeDataModule([TaskSpec(name="t", source="x.csv", kind="generative")])


def test_tokenizer_without_eos_is_refused(tmp_path):
    vocab = tiny_lm.vocab_size()
    assert causal_lm.eos_token_id(tiny_lm.tokenizer(), vocab) == tiny_lm.EOS_ID
    with pytest.raises(DivMergeError, match="no EOS token"):
        causal_lm.eos_token_id(tiny_lm.tokenizer(eos=False), vocab)
    # Qwen2Tokenizer then falls back to <|endoftext|>, a token these experts do not have
    tiny_lm.tokenizer(eos=False).save_pretrained(tmp_path)
    tiny_lm.config().save_pretrained(tmp_path)
    with pytest.raises(DivMergeError, match=f"outside the experts' {vocab}-token vocabulary"):
        causal_lm.eos_token_id(AutoTokenizer.from_pretrained(tmp_path), vocab)


def test_mixing_causal_lm_and_classifier_experts_is_refused(lm, tiny):
    with pytest.raises(DivMergeError, match="not a causal LM"):
        load_experts(lm["base"], {"first": lm["experts"]["first"], "alpha": tiny["experts"]["alpha"]})


# ------------------------------------------------------------------------------------- train.py fit
def write_config(tmp_path: Path, lm: dict, epochs: int = 3, **model_kw) -> str:
    run = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": cpu_trainer(run, epochs),
        "model": {
            "base": lm["base"],
            "experts": lm["experts"],
            "cache_dir": str(tmp_path / "cache"),
            "lr": 0.05,
            "lr_schedule": "constant",
            "max_new_tokens": 4,
            "teacher_top_k": 5,
            **model_kw,
        },
        "data": {
            "tasks": [
                {
                    "name": n,
                    "source": p,
                    "kind": "generative",
                    "prompt_template": tiny_lm.TEMPLATE,
                    "answer_column": "answer",
                    "num_unlabelled": 16,
                    "num_val": 4,
                    "num_test": 8,
                }
                for n, p in lm["data"].items()
            ],
            "batch_size_per_task": 4,
            "eval_batch_size": 8,
            "max_length": 16,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_on_generative_experts_lowers_the_divergence_and_reports_exact_match(
    tmp_path, lm, capsys, precision
):
    cli = train.main(["fit", "--config", write_config(tmp_path, lm), "--trainer.precision", precision])
    out = capsys.readouterr()
    assert "| ANP" in out.out + out.err
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    loss = metrics.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].mean()
    assert loss.iloc[-1] < loss.iloc[0]
    results = {r.task: r for r in cli.model.last_results}
    assert set(results) == {"first", "has_a"} and all(0 <= r.merged <= 1 for r in results.values())
    assert all(r.expert > 0.5 for r in results.values()), out.out  # the experts answer most test prompts
    assert len(list((tmp_path / "cache" / "teachers").glob("*-unlabelled-*-g4k5.pt"))) == 2


def test_classification_task_with_causal_lm_experts_is_refused(tmp_path, lm, capsys):
    config = yaml.safe_load(Path(write_config(tmp_path, lm)).read_text())
    config["data"]["tasks"][0] |= {
        "kind": "classification",
        "text_column": "words",
        "num_val": 0,
        "num_test": 0,
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "set `kind: generative`" in capsys.readouterr().err


def test_generative_rows_from_a_hub_subset_map_integer_labels_to_answers(monkeypatch):
    import datasets

    calls = []

    def fake_load(source, subset, split):
        calls.append((source, subset, split))
        return datasets.Dataset.from_dict({"sentence": ["it rains", "rain it"], "label": [1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("divmerge.data.check_available", lambda *args: None)  # as if cached
    spec = TaskSpec(
        name="cola",
        source="nyu-mll/glue",
        hub_subset="cola",
        hub_split="validation",
        kind="generative",
        prompt_template="Sentence: {sentence}\n",
        answer_column="label",
        label_names=["Answer: unacceptable", "Answer: acceptable"],
    )
    rows = load_rows(spec)
    assert calls == [("nyu-mll/glue", "cola", "validation")]
    assert rows.texts == ["Sentence: it rains\n", "Sentence: rain it\n"]
    assert rows.answers == ["Answer: acceptable", "Answer: unacceptable"] and rows.labels is None
    with pytest.raises(DivMergeError, match=r"prompt_template uses columns \['question'\]"):
        load_rows(replace(spec, prompt_template="Q: {question}"))
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.Dataset.from_dict({"sentence": ["x"], "label": [-1]}),  # a hidden test label
    )
    with pytest.raises(DivMergeError, match=r"holds \[-1\], which are not positions in label_names"):
        load_rows(spec)


def test_qwen_glue_config_is_a_gpu_cluster_run_of_generative_experts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(ROOT / "configs" / "qwen25_glue.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    trainer, model = config["trainer"], config["model"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"]) == ("gpu", 8, 2)
    assert (trainer["strategy"], trainer["precision"]) == ("ddp", "bf16-mixed")
    assert model["base"] == "Qwen/Qwen2.5-0.5B" and model["task_vector_dtype"] == "bfloat16"
    tasks = config["data"]["tasks"]
    assert len(tasks) == len(model["experts"]) == 7
    assert all(t["kind"] == "generative" and t["prompt_template"] and t["answer_column"] for t in tasks)


def test_static_merge_of_generative_experts_scored_by_a_text_metric(tmp_path, lm, capsys):
    config = write_config(tmp_path, lm)
    args = ["--model.method", "task_arithmetic", "--model.generation_metric", "CHRFScore"]
    cli = train.main(["test", "--config", config, *args])
    assert "static task_arithmetic merge" in capsys.readouterr().out
    results = cli.model.last_results
    assert [r.task for r in results] == ["first", "has_a"]
    assert all(0 < r.expert <= 1 and 0 <= r.merged <= 1 and r.reference is not None for r in results)


def test_generation_metric_per_task(tmp_path, lm, capsys):
    config = write_config(tmp_path, lm)
    args = ["--model.method", "task_arithmetic", "--model.generation_metric", "{has_a: CHRFScore}"]
    cli = train.main(["test", "--config", config, *args])
    kinds = {task: type(m["merged"]).__name__ for task, m in cli.model.metrics.items()}
    assert kinds == {"first": "MeanMetric", "has_a": "CHRFScore"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["test", "--config", config, "--model.generation_metric", "{nope: CHRFScore}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "names tasks ['nope'] that are not data tasks (first, has_a)" in err


def test_unknown_generation_metric_is_refused():
    with pytest.raises(DivMergeError, match="generation_metric 'ROUGE' is unknown: use one of exact_match"):
        causal_lm.CausalLM(generation_metric={"t": "ROUGE"})


def test_export_writes_the_merged_causal_lm_as_a_plain_hugging_face_model(tmp_path, lm, capsys):
    config = write_config(tmp_path, lm, epochs=1)
    cli = train.main(["fit", "--config", config])
    merged, out = cli.model.merged, tmp_path / "out"
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    train.main(["export", "--config", config, "--ckpt_path", str(ckpt), "--out_dir", str(out)])
    assert "exported layer-wise js merge" in capsys.readouterr().out
    model = Qwen2ForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids, mask = causal_lm.pad_sequences(prompts(PROMPTS), pad_id=0)
    with torch.no_grad():
        ours = causal_lm.forward(merged, merged.merged_params(), ids, mask).logits
    theirs = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).eos_token_id == tiny_lm.EOS_ID
    assert json.loads((out / "divmerge_export.json").read_text())["kind"] == "causal_lm"


def test_long_generative_prompts_keep_their_end(lm):
    words = " ".join(["a"] * 30)
    path = Path(lm["data"]["first"]).with_name("long.csv")
    pd.DataFrame({"words": [words] * 3, "answer": ["a"] * 3}).to_csv(path, index=False)
    spec = TaskSpec(
        name="first",
        source=str(path),
        kind="generative",
        prompt_template=tiny_lm.TEMPLATE,
        num_unlabelled=3,
        num_val=0,
        num_test=0,
    )
    dm = MergeDataModule([spec], tokenizer=lm["base"], max_length=8)
    ids = dm.dataset("first", "unlabelled").encodings[0]
    assert len(ids) == 8 and dm.tokenizer.decode(ids).endswith(" then")


CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _chat_spec(lm, **options) -> TaskSpec:
    return TaskSpec(
        name="first",
        source=lm["data"]["first"],
        kind="generative",
        prompt_template=tiny_lm.TEMPLATE,
        num_unlabelled=4,
        num_val=0,
        num_test=0,
        **options,
    )


def test_chat_template_sends_each_prompt_as_a_user_message(lm):
    plain = MergeDataModule([_chat_spec(lm)], tokenizer=lm["base"], max_length=64)
    chat = MergeDataModule([_chat_spec(lm, chat_template=True)], tokenizer=lm["base"], max_length=64)
    chat.tokenizer.chat_template = CHAT
    prompts = chat.rows("first")["unlabelled"].texts
    ids = chat.dataset("first", "unlabelled").encodings
    want = [chat.tokenizer(f"<user>{p}<assistant>", add_special_tokens=False)["input_ids"] for p in prompts]
    assert ids == want and ids != plain.dataset("first", "unlabelled").encodings
    assert chat.tokenizer.decode(ids[0]).endswith(f"{prompts[0]}<assistant>")


def test_chat_template_without_one_in_the_tokenizer_is_refused(lm):
    dm = MergeDataModule([_chat_spec(lm, chat_template=True)], tokenizer=lm["base"], max_length=64)
    assert not dm.tokenizer.chat_template
    with pytest.raises(DivMergeError, match="sets chat_template: true but the base's tokenizer has no chat"):
        dm.dataset("first", "unlabelled")


def test_chat_template_on_a_classification_task_is_refused():
    with pytest.raises(DivMergeError, match="chat_template applies to generative tasks"):
        check_task(TaskSpec(name="t", source="x.csv", chat_template=True))
