import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source
from divmerge.families import load_experts
from divmerge.families.classification import forward_tasks, task_logits
from tests.tiny import make_base, make_expert, tiny_config


@pytest.fixture(scope="module")
def expert_set(tiny):
    return load_experts(tiny["base"], tiny["experts"])


def test_task_vectors_stacked_and_exact(tiny, expert_set):
    base = BertForSequenceClassification.from_pretrained(tiny["experts"]["alpha"]).bert
    name = "encoder.layer.0.attention.self.query.weight"
    tau = expert_set.task_vectors[name]
    assert tau.shape == (2, *expert_set.base[name].shape)
    torch.testing.assert_close(expert_set.base[name] + tau[0], dict(base.named_parameters())[name])
    assert expert_set.num_labels == [2, 3]
    assert all(not t.requires_grad for t in expert_set.task_vectors.values())


def test_fingerprint_stable_and_sensitive(tiny, expert_set, tmp_path):
    assert load_experts(tiny["base"], tiny["experts"]).fingerprint == expert_set.fingerprint
    other = dict(tiny["experts"], beta=str(make_expert(tiny["base"], tmp_path / "b2", 3, seed=99)))
    changed = load_experts(tiny["base"], other)
    assert changed.fingerprint != expert_set.fingerprint
    assert changed.task_digests[0] == expert_set.task_digests[0]  # alpha's teacher cache stays valid
    assert changed.task_digests[1] != expert_set.task_digests[1]


def test_one_hot_coefficients_reproduce_each_expert(tiny, expert_set):
    merged = MergedModel(expert_set)
    ids = torch.randint(1000, 2000, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    for t, name in enumerate(["alpha", "beta"]):
        expert = BertForSequenceClassification.from_pretrained(tiny["experts"][name]).eval()
        want = expert(input_ids=ids, attention_mask=mask).logits
        got = task_logits(
            merged, t, merged.merged_params(merged.one_hot_table(t)), input_ids=ids, attention_mask=mask
        )
        assert (got - want).abs().max() < 1e-5


def test_merge_formula_and_gradient(expert_set):
    merged = MergedModel(expert_set, granularity="layer")
    with torch.no_grad():
        merged.coefficients.weight.uniform_(-1, 2, generator=torch.Generator().manual_seed(0))
    params = merged.merged_params()
    name = "encoder.layer.1.output.dense.weight"
    c = merged.coefficients.column(merged.coefficients.weight, name)
    want = (
        expert_set.base[name]
        + c[0] * expert_set.task_vectors[name][0]
        + c[1] * expert_set.task_vectors[name][1]
    )
    torch.testing.assert_close(params[f"bert.{name}"], want)
    ids = torch.randint(1000, 2000, (2, 5))
    task_logits(merged, 1, params, input_ids=ids, attention_mask=torch.ones_like(ids)).sum().backward()
    grad = merged.coefficients.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_coefficients_are_the_only_trainable_tensors(expert_set):
    merged = MergedModel(expert_set)
    assert [n for n, p in merged.named_parameters() if p.requires_grad] == ["coefficients.weight"]
    assert list(merged.state_dict()) == ["coefficients.weight"]
    assert not any(p.requires_grad for s in merged._skeletons for p in s.parameters())
    frozen = [merged.base, merged.task_vectors, merged.buffers_, *merged.heads]
    assert not any(t.requires_grad for store in frozen for _, t in store.items())


def test_frozen_tensors_follow_dtype_moves(expert_set):
    merged = MergedModel(expert_set).double()
    assert next(iter(merged.task_vectors.items()))[1].dtype == torch.float64


def test_missing_expert_directory(tiny, tmp_path):
    with pytest.raises(DivMergeError, match="does not exist"):
        load_experts(tiny["base"], {"alpha": str(tmp_path / "nope")})


def test_directory_without_model(tiny, tmp_path):
    with pytest.raises(DivMergeError, match=r"config\.json"):
        load_experts(tiny["base"], {"alpha": str(tmp_path)})


def test_no_experts(tiny):
    with pytest.raises(DivMergeError, match="No experts"):
        load_experts(tiny["base"], {})


def test_mismatched_architecture_names_expert_and_tensor(tiny, tmp_path):
    cfg = tiny_config()
    cfg.intermediate_size = 48
    other_base = make_base(tmp_path / "other", config=cfg)
    wrong = make_expert(other_base, tmp_path / "wrong", 2, seed=5)
    with pytest.raises(DivMergeError, match=r"Expert 'gamma' tensor 'bert\.encoder\.layer\.0\.intermediate"):
        load_experts(tiny["base"], {"alpha": tiny["experts"]["alpha"], "gamma": str(wrong)})


def test_vocabulary_mismatch_is_named(tiny, tmp_path):
    cfg = BertConfig(**{**tiny_config().to_dict(), "vocab_size": 30000})
    wrong = make_expert(make_base(tmp_path / "v", config=cfg), tmp_path / "vx", 2, seed=6)
    with pytest.raises(DivMergeError, match="word_embeddings"):
        load_experts(tiny["base"], {"delta": str(wrong)})


def test_extra_layers_are_named(tiny, tmp_path):
    cfg = tiny_config()
    cfg.num_hidden_layers = 3
    wrong = make_expert(make_base(tmp_path / "deep", config=cfg), tmp_path / "deepx", 2, seed=7)
    with pytest.raises(DivMergeError, match=r"encoder\.layer\.2.*not fine-tuned from this base"):
        load_experts(tiny["base"], {"deep": str(wrong)})


def test_unknown_demo_task():
    with pytest.raises(DivMergeError, match="rt"):
        resolve_source("zoo:nope")


def test_unavailable_hub_id_is_explained(tiny):
    with pytest.raises(DivMergeError, match="hub id"):
        load_experts(tiny["base"], {"alpha": "someone/not-a-model"})


def test_one_backbone_pass_for_all_tasks_equals_separate_passes(expert_set):
    merged = MergedModel(expert_set)
    g = torch.Generator().manual_seed(1)
    short = {
        "input_ids": torch.randint(1000, 2000, (3, 5), generator=g),
        "attention_mask": torch.ones(3, 5, dtype=torch.long),
    }
    long = {
        "input_ids": torch.randint(1000, 2000, (2, 9), generator=g),
        "attention_mask": torch.ones(2, 9, dtype=torch.long),
    }
    long["attention_mask"][1, 7:] = 0
    params = merged.merged_params()
    together = forward_tasks(merged, params, {0: short, 1: long})
    torch.testing.assert_close(together[0], task_logits(merged, 0, params, **short), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], task_logits(merged, 1, params, **long), atol=1e-5, rtol=1e-5)
    assert together[0].shape == (3, 2) and together[1].shape == (2, 3)


def test_subset_slices_task_vectors_and_heads(expert_set):
    sub = expert_set.subset(["beta"])
    assert sub.task_names == ["beta"] and sub.num_labels == [3]
    name = expert_set.names[3]
    torch.testing.assert_close(sub.task_vectors[name][0], expert_set.task_vectors[name][1])
    assert sub.fingerprint != expert_set.fingerprint and sub.task_digests == expert_set.task_digests[1:]
    with pytest.raises(DivMergeError, match="subset"):
        expert_set.subset(["gamma"])


def test_bf16_task_vectors_halve_memory_and_stay_close(expert_set):
    full = MergedModel(expert_set)
    half = MergedModel(expert_set, task_vector_dtype=torch.bfloat16)
    assert half.task_vectors.numel() == full.task_vectors.numel()
    assert next(iter(half.task_vectors.items()))[1].dtype == torch.bfloat16
    a, b = full.merged_params(), half.merged_params()
    assert all(b[k].dtype == torch.float32 for k in b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < worst < 1e-2  # rounded storage, float32 arithmetic


def test_held_out_head_is_evaluated_on_base_backbone(tiny):
    es = load_experts(
        tiny["base"], {"alpha": tiny["experts"]["alpha"]}, held_out={"beta": tiny["experts"]["beta"]}
    )
    assert es.task_names == ["alpha"] and es.all_tasks == ["alpha", "beta"] and es.num_labels == [2, 3]
    assert next(iter(es.task_vectors.values())).shape[0] == 1  # beta is not merged
    merged = MergedModel(es)
    ids = torch.randint(1000, 2000, (3, 6), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    got = forward_tasks(merged, merged.merged_params(merged.base_table()), {1: inputs})[1]
    want_model = BertForSequenceClassification.from_pretrained(tiny["experts"]["beta"]).eval()
    want_model.bert.load_state_dict(
        BertForSequenceClassification.from_pretrained(tiny["base"]).bert.state_dict()
    )
    assert (got - want_model(**inputs).logits).abs().max() < 1e-5
    with pytest.raises(DivMergeError, match="both experts and held out"):
        load_experts(
            tiny["base"], {"beta": tiny["experts"]["beta"]}, held_out={"beta": tiny["experts"]["beta"]}
        )


def test_task_vectors_stacked_in_the_storage_dtype(tiny, expert_set):
    half = load_experts(tiny["base"], tiny["experts"], task_vector_dtype=torch.bfloat16)
    for name, tau in expert_set.task_vectors.items():
        assert half.task_vectors[name].dtype == torch.bfloat16
        torch.testing.assert_close(half.task_vectors[name], tau.to(torch.bfloat16), atol=0, rtol=0)
    assert half.fingerprint == expert_set.fingerprint  # same experts: teacher caches stay valid
