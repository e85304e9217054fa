import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.func import functional_call
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.export import classifier as export
from divmerge.export import coefficient_stats, export_merged, load_task_model, read_export_info
from divmerge.families import load_experts
from divmerge.families.classification import task_logits

TEXTS = ["good movie great plot", "free money call now win", "who won the vote", "bad"]
TOL = 1e-5


@pytest.fixture(scope="module")
def merged(tiny) -> MergedModel:
    model = MergedModel(load_experts(tiny["base"], tiny["experts"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.coefficients.weight
        weight.copy_(torch.rand(weight.shape, generator=generator) * 2.0 - 0.5)  # uniform in [-0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def params(merged) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return merged.merged_params()


def summary_for(merged: MergedModel, tiny: dict, method: str = "divmerge") -> dict:
    return {
        "method": method,
        "objective": "jensen-shannon",
        "granularity": "layer",
        "coefficients": coefficient_stats(merged.coefficients(), merged.task_names),
        "experts": dict(tiny["experts"]),
        "steps": torch.tensor(7),
        "clamp": (0.0, 1.0),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory, merged, params, tiny) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    return export_merged(merged, params, tiny["base"], out, summary_for(merged, tiny))


@pytest.fixture(scope="module")
def inputs(tiny) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_task_models_match_merged_logits(exported, merged, params, inputs):
    for t, task in enumerate(merged.task_names):
        model = load_task_model(exported, task)
        assert type(model) is type(merged._skeletons[t])
        assert not model.training
        skeleton_config = merged._skeletons[t].config
        assert model.config.num_labels == skeleton_config.num_labels
        assert model.config.id2label == skeleton_config.id2label
        with torch.no_grad():
            got = model(**inputs).logits
            want = task_logits(merged, t, params, **inputs)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < TOL


def test_backbone_loads_with_plain_transformers(exported, merged, params, inputs, tiny):
    backbone = AutoModel.from_pretrained(exported).eval()
    with torch.no_grad():
        hidden = backbone(**inputs).last_hidden_state
        skeleton = merged._skeletons[0].get_submodule(merged.prefix)
        cut = len(merged.prefix) + 1
        tensors = {n[cut:]: v for n, v in params.items()} | {n[cut:]: v for n, v in merged.buffers_.items()}
        want = functional_call(skeleton, tensors, args=(), kwargs=inputs).last_hidden_state
        task_model = load_task_model(exported, merged.task_names[1])
        via_task = task_model.get_submodule(merged.prefix)(**inputs).last_hidden_state
    assert (hidden - want).abs().max().item() < TOL
    assert (hidden - via_task).abs().max().item() < TOL
    with safe_open(str(exported / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata() == {"format": "pt"}
    base_keys = set(AutoModel.from_pretrained(tiny["base"]).state_dict())
    assert keys == base_keys
    assert not any(k.startswith(merged.prefix + ".") for k in keys)


def test_one_hot_export_reproduces_each_expert(tmp_path, merged, inputs, tiny):
    for t, task in enumerate(merged.task_names):
        with torch.no_grad():
            one_hot = merged.merged_params(merged.one_hot_table(t))
        out = export_merged(merged, one_hot, tiny["base"], tmp_path / task, {"method": f"one-hot {task}"})
        expert = AutoModelForSequenceClassification.from_pretrained(tiny["experts"][task]).eval()
        with torch.no_grad():
            got = load_task_model(out, task)(**inputs).logits
            want = expert(**inputs).logits
        assert (got - want).abs().max().item() < TOL


def test_tokenizer_card_and_metadata(exported, merged, tiny):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    base_tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    assert tokenizer(TEXTS)["input_ids"] == base_tokenizer(TEXTS)["input_ids"]
    assert (exported / "tokenizer_config.json").is_file()
    card = (exported / "README.md").read_text()
    assert "divmerge" in card and "jensen-shannon" in card
    for task in merged.task_names:
        assert task in card
        assert tiny["experts"][task] in card
        assert (exported / "heads" / task / "head.safetensors").is_file()
        assert (exported / "heads" / task / "config.json").is_file()
    assert "load_task_model" in card and "AutoModel.from_pretrained" in card
    info = read_export_info(exported)
    assert info["task_names"] == merged.task_names
    assert list(info["tasks"]) == merged.task_names
    assert info["summary"]["method"] == "divmerge"
    assert info["summary"]["steps"] == 7
    assert info["summary"]["clamp"] == [0.0, 1.0]
    assert set(info["summary"]["coefficients"]) == set(merged.task_names)
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert set(info["files"]) == files
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["BertModel"]
    assert leftovers(exported.parent) == []


def test_unmerged_backbone_tensors_come_from_base(tmp_path, merged, params, tiny):
    name = f"{merged.prefix}.pooler.dense.bias"
    partial = {n: v for n, v in params.items() if n != name}
    out = export_merged(merged, partial, tiny["base"], tmp_path / "out", {"method": "partial"})
    base = AutoModel.from_pretrained(tiny["base"]).state_dict()
    exported = AutoModel.from_pretrained(out).state_dict()
    assert torch.equal(exported["pooler.dense.bias"], base["pooler.dense.bias"])
    assert not torch.equal(params[name], base["pooler.dense.bias"])
    assert read_export_info(out)["backbone"]["from_base"] == ["pooler.dense.bias"]


def test_existing_dir_is_refused_and_untouched(tmp_path, merged, params, tiny, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    def boom(*args, **kwargs):
        raise AssertionError("export did work before checking the target")

    monkeypatch.setattr(export, "resolve_source", boom)
    monkeypatch.setattr(export, "save_file", boom)
    with pytest.raises(DivMergeError, match="exists and is not empty: pass --overwrite"):
        export_merged(merged, params, tiny["base"], out, {"method": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_existing_empty_dir_is_used(tmp_path, merged, params, tiny):
    out = tmp_path / "out"
    out.mkdir()
    export_merged(merged, params, tiny["base"], out, {"method": "x"})
    assert (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_overwrite_replaces(tmp_path, merged, params, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_merged(merged, params, tiny["base"], out, {"method": "new"}, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert read_export_info(out)["summary"]["method"] == "new"
    assert leftovers(tmp_path) == []


def test_failure_mid_export_leaves_nothing(tmp_path, merged, params, tiny, monkeypatch):
    calls = []
    real_save = export.save_file

    def fail_on_head(tensors, filename, metadata=None):
        calls.append(filename)
        if Path(filename).name == "head.safetensors":
            raise RuntimeError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export, "save_file", fail_on_head)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export_merged(merged, params, tiny["base"], out, {"method": "x"})
    assert len(calls) == 2  # the backbone was written, then the first head failed
    assert not out.exists()
    assert leftovers(tmp_path) == []

    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(RuntimeError, match="disk full"):
        export_merged(merged, params, tiny["base"], out, {"method": "x"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_directory_holding_the_inputs(tmp_path, merged, params, tiny):
    with pytest.raises(DivMergeError, match="contains the input model"):
        export_merged(merged, params, tiny["base"], Path(tiny["base"]).parent, {}, overwrite=True)
    assert Path(tiny["base"], "config.json").is_file()


def test_bad_inputs(tmp_path, exported, merged, params, tiny):
    with pytest.raises(DivMergeError, match="is not a tensor of the base model"):
        export_merged(merged, {"encoder.x": params[next(iter(params))]}, tiny["base"], tmp_path / "a", {})
    assert leftovers(tmp_path) == [] and not (tmp_path / "a").exists()
    with pytest.raises(DivMergeError, match="has no task 'nope'"):
        load_task_model(exported, "nope")
    with pytest.raises(DivMergeError, match="is not a divmerge export"):
        load_task_model(tmp_path, merged.task_names[0])


def test_coefficient_stats():
    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    stats = coefficient_stats(table, ["a", "b"])
    assert stats["a"] == pytest.approx({"mean": 1.0, "min": 0.0, "max": 2.0, "std": (2 / 3) ** 0.5})
    assert stats["b"] == pytest.approx({"mean": 1.0, "min": 1.0, "max": 1.0, "std": 0.0})


def test_a_killed_exports_temporary_directory_is_cleaned_up(tmp_path):
    from divmerge.export.common import atomic_dir

    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999-deadbeef"  # a killed export's leftovers
    live = tmp_path / f".out.tmp-{os.getpid()}-cafecafe"  # an export still running
    dead.mkdir()
    live.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").is_file() and not dead.exists() and live.exists()
