"""peft LoRA experts: exact one-hot reproduction, mixed sets vs a densified reference, memory, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import IA3Config, LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import BertForSequenceClassification

import train
from divmerge.core import lora
from divmerge.core.merged_model import MergedModel
from divmerge.engine import Merger
from divmerge.errors import DivMergeError
from divmerge.export import coefficient_stats, export_merged, load_task_model
from divmerge.families import load_experts
from divmerge.families.classification import step_loss, task_logits
from divmerge.objectives import js_divergence
from divmerge.static import static_merge
from divmerge.zoo import demo as zoo
from tests.test_cli import write_config
from tests.tiny import copy_tokenizer, make_base, make_expert, tiny_config


def make_lora_expert(base: Path, path: Path, num_labels: int, seed: int, **lora_options: object) -> Path:
    """A SEQ_CLS LoRA adapter over ``base`` with random (non-zero) A, B and classifier."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"]} | lora_options
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **options))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(path)
    return path


def peft_logits(base: Path, adapter: Path, num_labels: int, inputs: dict) -> torch.Tensor:
    model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    return PeftModel.from_pretrained(model, adapter).eval()(**inputs).logits.detach()


def densified(base: Path, adapter: Path, num_labels: int, path: Path) -> Path:
    """The adapter merged into a full model (peft merge_and_unload): the dense reference expert."""
    model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(path)
    copy_tokenizer(path)
    return path


def batch(seed: int, rows: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - 2 :] = 0
    return {"input_ids": torch.randint(1000, 2000, (rows, length), generator=g), "attention_mask": mask}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root / "base")
    full = make_expert(base, root / "full", 2, seed=1)
    plain = make_lora_expert(base, root / "plain", 3, seed=2)
    # DoRA and a LoRA on the word embeddings: layer types that are densified
    dora = make_lora_expert(
        base, root / "dora", 2, seed=3, target_modules=["key", "word_embeddings"], use_dora=True
    )
    return {
        "root": root,
        "base": base,
        "full": full,
        "plain": plain,
        "dora": dora,
        "plain_dense": densified(base, plain, 3, root / "plain_dense"),
    }


@pytest.mark.parametrize(("kind", "num_labels"), [("plain", 3), ("dora", 2)])
def test_one_hot_adapter_reproduces_peft_model(setup, kind, num_labels):
    experts = load_experts(str(setup["base"]), {"full": str(setup["full"]), kind: str(setup[kind])})
    merged = MergedModel(experts)
    inputs = batch(0)
    with torch.no_grad():
        ours = task_logits(merged, 1, merged.merged_params(merged.one_hot_table(1)), **inputs)
    reference = peft_logits(setup["base"], setup[kind], num_labels, inputs)
    assert (ours - reference).abs().max() < 1e-5


def test_plain_lora_is_kept_as_factors_and_costs_adapter_memory(setup):
    experts = load_experts(str(setup["base"]), {"full": str(setup["full"]), "plain": str(setup["plain"])})
    assert all(rows == [0] for rows in experts.dense_rows.values())  # the adapter stores no dense row
    assert len(experts.lora) == 2 * 5 + 1  # query, value and 3 `dense` per layer, and the pooler's
    adapter_bytes = sum(s.a.nbytes + s.b.nbytes for s in experts.lora.values())
    full_bytes = sum(tau[0].nbytes for tau in experts.task_vectors.values())  # one full task vector
    assert adapter_bytes < 0.02 * full_bytes


@pytest.mark.parametrize("backbone_pass", ["per_task", "joint"])
def test_mixed_set_gradients_match_densified_reference(setup, backbone_pass):
    base = str(setup["base"])
    mixed = MergedModel(load_experts(base, {"full": str(setup["full"]), "plain": str(setup["plain"])}))
    dense = MergedModel(load_experts(base, {"full": str(setup["full"]), "plain": str(setup["plain_dense"])}))
    g = torch.Generator().manual_seed(5)
    batches = {0: batch(1), 1: batch(2, rows=2, length=9)}
    teachers = {0: torch.log_softmax(torch.randn(3, 2, generator=g), -1)}
    teachers[1] = torch.log_softmax(torch.randn(2, 3, generator=g), -1)
    results = []
    for merged in (mixed, dense):
        with torch.no_grad():
            merged.coefficients.weight.uniform_(-0.5, 1.0, generator=torch.Generator().manual_seed(4))
        loss, _ = step_loss(
            merged,
            merged.merged_params(),
            batches,
            lambda t, student: js_divergence(teachers[t], student).mean(),
            backbone_pass=backbone_pass,
        )
        loss.backward()
        results.append((loss.detach(), merged.coefficients.weight.grad.clone()))
    (loss_mixed, grad_mixed), (loss_dense, grad_dense) = results
    torch.testing.assert_close(loss_mixed, loss_dense, atol=1e-6, rtol=1e-5)
    assert grad_mixed[1].abs().sum() > 0  # the adapter's coefficients learn
    torch.testing.assert_close(grad_mixed, grad_dense, atol=1e-6, rtol=1e-4)


def test_densified_views_match_the_dense_reference(setup):
    """Static merges and export see the adapter as its dense update."""
    base = str(setup["base"])
    mixed = MergedModel(load_experts(base, {"full": str(setup["full"]), "plain": str(setup["plain"])}))
    dense = MergedModel(load_experts(base, {"full": str(setup["full"]), "plain": str(setup["plain_dense"])}))
    taus = mixed.dense_task_vectors()
    for name in dense.names:
        torch.testing.assert_close(taus[name], dense.task_vectors[name], atol=1e-6, rtol=1e-5)
    ties = static_merge("ties", dict(mixed.base.items()), taus)
    assert set(ties) == set(dense.names)
    table = torch.randn_like(mixed.coefficients.weight)
    with torch.no_grad():
        folded = mixed.dense_params(mixed.merged_params(table))
        reference = dense.merged_params(table)
    assert not any(n.endswith((lora.LORA_A, lora.LORA_B)) for n in folded)
    for name, tensor in reference.items():
        torch.testing.assert_close(folded[name], tensor, atol=1e-6, rtol=1e-5)


def test_subset_keeps_each_adapters_factors(setup):
    experts = load_experts(
        str(setup["base"]),
        {"full": str(setup["full"]), "plain": str(setup["plain"]), "dora": str(setup["dora"])},
    )
    sub = experts.subset(["dora", "plain"])
    merged = MergedModel(sub)
    inputs = batch(3)
    with torch.no_grad():
        ours = task_logits(merged, 1, merged.merged_params(merged.one_hot_table(1)), **inputs)
    assert (ours - peft_logits(setup["base"], setup["plain"], 3, inputs)).abs().max() < 1e-5
    assert all(set(stack.task.tolist()) == {1} for stack in sub.lora.values())


def test_adapter_of_another_base_with_other_weights_is_refused(setup):
    other = make_base(setup["root"] / "other_base", seed=9)  # same shapes, other weights
    adapter = make_lora_expert(other, setup["root"] / "other_adapter", 2, seed=4)
    with pytest.raises(DivMergeError, match=r"weights differ from the configured base.*set model.base"):
        load_experts(str(setup["base"]), {"a": str(adapter)})


def test_adapter_that_does_not_fit_the_base_is_refused(setup):
    config = tiny_config()
    config.hidden_size = 24
    wide = make_base(setup["root"] / "wide_base", config=config)
    adapter = make_lora_expert(wide, setup["root"] / "wide_adapter", 2, seed=5)
    config_file = adapter / "adapter_config.json"  # recorded base not available here (a hub id)
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": "org/wide"})
    )
    with pytest.raises(
        DivMergeError, match=r"does not fit the configured base.*size mismatch.*set model.base"
    ):
        load_experts(str(setup["base"]), {"a": str(adapter)})


def test_vocabulary_mismatch_is_refused(setup):
    model = BertForSequenceClassification.from_pretrained(setup["base"], num_labels=2)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    path = setup["root"] / "resized"
    model.save_pretrained(path)
    vocabulary = (
        r"vocabulary of 30530 tokens \(bert\.embeddings\.word_embeddings\.weight\) but the base has 30522"
    )
    with pytest.raises(DivMergeError, match=vocabulary + ".*use experts"):
        load_experts(str(setup["base"]), {"full": str(setup["full"]), "resized": str(path)})


def test_export_folds_the_adapters_into_a_plain_model(setup, tmp_path):
    base = str(setup["base"])
    merged = MergedModel(load_experts(base, {"full": str(setup["full"]), "plain": str(setup["plain"])}))
    with torch.no_grad():
        merged.coefficients.weight.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(1))
        params = merged.merged_params()
    summary = {
        "method": "divmerge",
        "coefficients": coefficient_stats(merged.coefficients(), merged.task_names),
    }
    out = export_merged(merged, params, base, tmp_path / "export", summary)
    inputs = batch(4)
    with torch.no_grad():
        got = load_task_model(out, "plain")(**inputs).logits
        want = task_logits(merged, 1, params, **inputs)
    assert (got - want).abs().max() < 1e-5


def test_fit_and_static_test_with_an_adapter_expert(tmp_path, tiny, capsys):
    adapter = make_lora_expert(Path(tiny["base"]), tmp_path / "beta_lora", 3, seed=7)
    config = write_config(
        tmp_path, tiny, experts={"alpha": tiny["experts"]["alpha"], "beta": str(adapter)}, epochs=1
    )
    cli = train.main(["fit", "--config", config])
    merged = cli.model.merged
    columns = [merged.coefficients.layout.columns[f"{m}.weight"].start for m in merged.lora_b]
    assert columns and (merged.coefficients.weight[1, columns] != 0.5).all()  # the adapter's moved
    report = json.loads(next((tmp_path / "run").rglob("report_test.json")).read_text())
    assert [r["task"] for r in report["tasks"]] == ["alpha", "beta"] and math.isfinite(report["anp"])
    train.main(["test", "--config", config, "--model.method", "ties"])
    assert "| ANP" in capsys.readouterr().out


def test_demo_lora_config_parses_and_names_lora_experts(capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "demo4_lora.yaml"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["experts"] == {t: f"zoo:lora/{t}" for t in ("rt", "sms_spam", "trec", "bbc")}


def test_zoo_lora_names_and_cache_keys(tmp_path):
    assert zoo.demo_expert("lora/rt") == ("rt", zoo.LORA_RECIPE)
    assert zoo.demo_expert("rt") == ("rt", zoo.ExpertRecipe())
    assert "lora_rank" not in zoo.ExpertRecipe().as_dict()  # full experts keep their cache keys
    assert zoo.expert_dir("rt", zoo.LORA_RECIPE, tmp_path) != zoo.expert_dir("rt", cache_dir=tmp_path)
    with pytest.raises(DivMergeError, match="lora_rank"):
        zoo.ExpertRecipe(lora_rank=0)


def test_zoo_builds_a_lora_adapter_that_merges_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "_POOL_EVAL_ROWS", 16)
    recipe = zoo.ExpertRecipe(num_train=16, epochs=1, max_length=8, batch_size=8, lora_rank=2)
    path = zoo.build_expert("trec", recipe, cache_dir=tmp_path, progress=False)
    assert (path / "adapter_config.json").is_file() and not (path / "model.safetensors").exists()
    assert json.loads((path / zoo.EXPERT_META_FILE).read_text())["recipe"]["lora_rank"] == 2
    experts = load_experts("zoo:minilm", {"trec": str(path)})
    assert experts.lora and not any(experts.dense_rows.values())  # nothing densified
    merged = MergedModel(experts)
    inputs = batch(6)
    with torch.no_grad():
        ours = task_logits(merged, 0, merged.merged_params(merged.one_hot_table(0)), **inputs)
    assert (ours - peft_logits(zoo.base_model_path(), path, 6, inputs)).abs().max() < 1e-5


def test_adapter_without_a_classifier_is_refused(setup):
    model = BertForSequenceClassification.from_pretrained(setup["base"], num_labels=2)
    path = setup["root"] / "no_head"  # no task_type: peft saves no classifier
    get_peft_model(model, LoraConfig(r=2, target_modules=["query"])).save_pretrained(path)
    with pytest.raises(DivMergeError, match=r"no classification head.*task_type='SEQ_CLS'"):
        load_experts(str(setup["base"]), {"a": str(path)})


def test_non_lora_adapter_is_refused(setup):
    model = BertForSequenceClassification.from_pretrained(setup["base"], num_labels=2)
    path = setup["root"] / "ia3"
    config = IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["query"], feedforward_modules=[])
    get_peft_model(model, config).save_pretrained(path)
    with pytest.raises(DivMergeError, match=r"IA3 adapter.*merge_and_unload"):
        load_experts(str(setup["base"]), {"a": str(path)})


def test_a_static_start_over_adapters_matches_the_densified_reference(setup):
    """Adapters stay factors around a static start; the merge equals the densified experts' merge."""
    base = str(setup["base"])
    mergers = []
    for plain in ("plain", "plain_dense"):
        experts = load_experts(base, {"full": str(setup["full"]), "plain": str(setup[plain])})
        mergers.append(Merger.from_expert_set(experts, granularity="layer", start_from="ties"))
    mixed, dense = (m.build().dense_params(m.learned_params()) for m in mergers)
    ties = mergers[1].static_params("ties")  # step 0 (c = 0) is the static merge
    assert mixed.keys() == dense.keys() and ties.keys() <= dense.keys()
    for name, tensor in ties.items():
        torch.testing.assert_close(mixed[name], tensor, atol=1e-6, rtol=1e-5)
    for merger in mergers:
        with torch.no_grad():
            merger.build().coefficients.weight.uniform_(-0.5, 1.0, generator=torch.Generator().manual_seed(4))
    mixed, dense = (m.build().dense_params(m.learned_params()) for m in mergers)
    assert any(not torch.allclose(mixed[name], tensor) for name, tensor in ties.items())
    for name, tensor in dense.items():
        torch.testing.assert_close(mixed[name], tensor, atol=1e-6, rtol=1e-5)
