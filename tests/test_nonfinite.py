"""NaN and inf (issue 31, item 4) and the checkpoint format version (item 6).

A NaN in an expert is refused at load, naming the expert and the tensor; a loss or coefficient that turns
non-finite stops training with the step and the task named, keeping the last (finite) checkpoint; a
non-finite merge is never evaluated. Checkpoints record divmerge's format; a newer one is refused.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from divmerge.engine import Merger
from divmerge.errors import DivMergeError
from divmerge.experts import sharded_loading
from divmerge.experts.finite import nonfinite_kind
from divmerge.families import load_experts
from divmerge.families.causal_lm import CausalLM
from divmerge.lightning.checkpoint_io import CHECKPOINT_FORMAT, FORMAT_KEY, check_checkpoint
from divmerge.lightning.module import DivMergeModule
from divmerge.lightning.nonfinite import refuse_nonfinite_merge
from tests import tiny_lm
from tests.test_cli import expect_error, write_config
from tests.test_lora_causal import make_lora_lm

QUERY = "encoder.layer.1.attention.self.query.weight"


def poisoned(
    src: str, dst: Path, value: float, name: str | None = None, file: str = "model.safetensors"
) -> str:
    """A copy of a model directory with one element of one tensor (the first matching ``name``) set."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / file)
    key = next(k for k in tensors if name is None or k.endswith(name))
    tensors[key].view(-1)[-1] = value  # the last element: on the last rank when read in column shards
    save_file(tensors, dst / file, metadata={"format": "pt"})
    return str(dst)


def test_nonfinite_kind_tells_nan_from_inf_and_accepts_a_finite_overflow():
    assert nonfinite_kind(torch.tensor([1.0, float("nan")])) == "NaN"
    assert nonfinite_kind(torch.tensor([float("inf"), float("-inf"), 1.0])) == "inf"
    assert nonfinite_kind(torch.tensor([float("nan"), float("-inf")])) == "NaN and inf"
    assert nonfinite_kind(torch.full((4,), 60000.0, dtype=torch.float16)) is None  # the sum overflows
    assert nonfinite_kind(torch.zeros(3, dtype=torch.long)) is None


@pytest.mark.parametrize(
    ("target", "value", "message"),
    [
        ("alpha", float("nan"), f"Expert 'alpha' has non-finite values (NaN) in 'bert.{QUERY}'"),
        ("beta", float("-inf"), f"Expert 'beta' has non-finite values (inf) in 'bert.{QUERY}'"),
        ("base", float("inf"), f"has non-finite values (inf) in '{QUERY}'"),
    ],
)
def test_a_nonfinite_expert_or_base_is_refused_at_load(tmp_path, tiny, capsys, target, value, message):
    source = tiny["base"] if target == "base" else tiny["experts"][target]
    bad = poisoned(source, tmp_path / "bad", value, QUERY)
    setup = (
        {**tiny, "base": bad} if target == "base" else {**tiny, "experts": {**tiny["experts"], target: bad}}
    )
    err = expect_error(capsys, ["fit", "--config", write_config(tmp_path, setup, epochs=1)], message)
    assert len(err.strip().splitlines()) == 1 and err.count("divmerge: error:") == 1, err
    assert not (tmp_path / "run").exists(), "a refused run left files behind"


@pytest.fixture(scope="module")
def lm_parts(tmp_path_factory) -> dict:
    """A tiny Qwen2 base, a full expert (the base, re-saved) with a NaN, and a LoRA adapter with a NaN."""
    root = tmp_path_factory.mktemp("nonfinite_lm")
    base = tiny_lm.make_base(root / "base")
    adapter = make_lora_lm(base, root / "adapter", seed=1)
    return {
        "base": str(base),
        "full": poisoned(str(base), root / "full", float("nan"), "model.norm.weight"),
        "adapter": poisoned(
            str(adapter), root / "adapter_nan", float("nan"), "lora_B.weight", "adapter_model.safetensors"
        ),
    }


def test_a_lora_adapter_with_a_nan_factor_is_refused(lm_parts):
    with pytest.raises(
        DivMergeError, match=r"Expert 'ad' has non-finite values \(NaN\) in '.*lora_B.weight'"
    ):
        load_experts(lm_parts["base"], {"ad": lm_parts["adapter"]})


class TwoRanks:
    """Rank ``rank`` of a 2-rank mesh, in this process: ``all_gather_object`` hands back ``others``."""

    def __init__(self, rank: int, others: tuple | None = None) -> None:
        self.rank, self.others, self.sent = rank, others, None

    def get_local_rank(self) -> int:
        return self.rank

    def size(self) -> int:
        return 2

    def get_group(self) -> None:
        return None

    def all_gather_object(self, out: list, obj: tuple, group=None) -> None:
        self.sent = obj
        out[:] = [obj, obj] if self.others is None else [obj, self.others]


@pytest.mark.parametrize("which", ["full", "adapter"])
def test_sharded_loading_stops_every_rank_on_a_nan_one_rank_reads(lm_parts, monkeypatch, which):
    """The NaN is the last element of a tensor: only rank 1 reads it, yet rank 0 stops with the same line
    (it learns of it in the digests' all-gather) instead of going on to wait in a collective."""
    paths = {"base": lm_parts["base"], "x": lm_parts[which]}
    rank1 = TwoRanks(1)
    monkeypatch.setattr(sharded_loading.dist, "all_gather_object", rank1.all_gather_object)
    with pytest.raises(DivMergeError, match=r"Expert 'x' has non-finite values \(NaN\)") as one:
        sharded_loading.load_sharded(CausalLM(), paths, paths, rank1, None)
    assert ("'model.norm.weight'" if which == "full" else "lora_B.weight'") in str(one.value)
    rank0 = TwoRanks(0, rank1.sent)
    monkeypatch.setattr(sharded_loading.dist, "all_gather_object", rank0.all_gather_object)
    with pytest.raises(DivMergeError) as zero:
        sharded_loading.load_sharded(CausalLM(), paths, paths, rank0, None)
    assert str(zero.value) == str(one.value)
    assert (rank0.sent[1] is None) == (which == "full")  # rank 0's own columns of the expert are finite


# ------------------------------------------------------------------ training


def nan_at_step(monkeypatch, step: int, task: str) -> None:
    """From training step ``step`` (1-based) on, ``task``'s loss is NaN."""
    original, calls = Merger.step_loss, []

    def step_loss(self, batch, split="unlabelled", params=None):
        loss, per_task = original(self, batch, split, params)
        if split == "unlabelled" and params is None:
            calls.append(1)
            if len(calls) >= step:
                per_task[task] = torch.tensor(float("nan"))
                loss = loss + float("nan")
        return loss, per_task

    monkeypatch.setattr(Merger, "step_loss", step_loss)


def test_a_nan_loss_stops_training_and_keeps_the_last_finite_checkpoint(tmp_path, tiny, capsys, monkeypatch):
    config = write_config(tmp_path, tiny, epochs=3)  # 3 steps per epoch: last.ckpt written after step 3
    nan_at_step(monkeypatch, 5, "beta")
    err = expect_error(capsys, ["fit", "--config", config], "Training step 5: the loss of task 'beta' is nan")
    assert len(err.strip().splitlines()) == 1, err
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert str(last) in err
    state = torch.load(last, weights_only=True)
    assert (
        state["global_step"] == 3 and torch.isfinite(state["state_dict"]["merged.coefficients.weight"]).all()
    )
    monkeypatch.undo()
    check_checkpoint(last)  # loadable: a divmerge checkpoint of a finite merge
    train.main(["test", "--config", config, "--ckpt_path", str(last)])
    assert "| ANP" in capsys.readouterr().out


def test_an_overflowing_step_stops_before_a_checkpoint_records_it(tmp_path, tiny, capsys, monkeypatch):
    """A finite loss whose gradient overflows: Adam's inf / inf makes a coefficient NaN at step 4."""

    def overflow(module, optimizer):
        if module.trainer.global_step == 3:  # before the 4th step, after last.ckpt (step 3)
            module.merged.coefficients.weight.grad[1, 0] = float("inf")

    monkeypatch.setattr(DivMergeModule, "on_before_optimizer_step", overflow)
    config = write_config(tmp_path, tiny, epochs=2)
    message = "Training step 4: the optimizer step made the coefficients of task 'beta' NaN"
    err = expect_error(capsys, ["fit", "--config", config], message)
    assert "last.ckpt" in err and len(err.strip().splitlines()) == 1, err
    state = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert (
        state["global_step"] == 3 and torch.isfinite(state["state_dict"]["merged.coefficients.weight"]).all()
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny) -> Path:
    """The last.ckpt of a finished one-epoch run (3 steps); read-only: tests rewrite copies of it."""
    root = tmp_path_factory.mktemp("finished")
    train.main(["fit", "--config", write_config(root, tiny, epochs=1)])
    return root / "run" / "ckpt" / "last.ckpt"


def rewrite(ckpt: Path, dst: Path, edit) -> str:
    state = torch.load(ckpt, weights_only=True)
    edit(state)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)
    return str(dst)


def test_a_nan_coefficient_checkpoint_is_never_evaluated_or_exported(tmp_path, tiny, finished, capsys):
    config = write_config(tmp_path, tiny, epochs=1)
    table = "merged.coefficients.weight"
    nan = rewrite(finished, tmp_path / "nan.ckpt", lambda s: s["state_dict"][table][1, 0].fill_(float("nan")))
    for sub in ("test", "validate", "fit", "export"):
        args = [sub, "--config", config, "--ckpt_path", nan]
        args += ["--out_dir", str(tmp_path / "out")] if sub == "export" else []
        err = expect_error(capsys, args, "holds NaN coefficients (for task 'beta')")
        assert "| ANP" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_nonfinite_merge_is_not_evaluated():
    """The last guard, before any evaluation (validate / test): whatever loaded the coefficients."""
    with pytest.raises(DivMergeError, match="coefficients for task 'b' are inf, so it is not evaluated"):
        refuse_nonfinite_merge(torch.tensor([[0.5, 0.5], [0.5, float("inf")]]), ["a", "b"], "evaluated")


# ------------------------------------------------------------------ format version


def test_checkpoints_record_their_format_and_a_newer_one_is_refused(tmp_path, tiny, finished, capsys):
    config = write_config(tmp_path, tiny, epochs=1)
    assert torch.load(finished, weights_only=True)[FORMAT_KEY] == CHECKPOINT_FORMAT
    later = {FORMAT_KEY: CHECKPOINT_FORMAT + 1}
    newer = rewrite(finished, tmp_path / "run" / "ckpt" / "last.ckpt", lambda s: s.update(later))
    message = f"written by a newer divmerge (checkpoint format {CHECKPOINT_FORMAT + 1}"
    for sub, ckpt in (
        ("fit", newer),
        ("fit", "last"),
        ("test", newer),
        ("validate", newer),
        ("export", newer),
    ):
        args = [sub, "--config", config, "--ckpt_path", ckpt]
        args += ["--out_dir", str(tmp_path / "out")] if sub == "export" else []
        err = expect_error(capsys, args, message)
        assert "upgrade divmerge" in err and len(err.strip().splitlines()) == 1, err
    odd = rewrite(finished, tmp_path / "odd.ckpt", lambda s: s.update({FORMAT_KEY: "one"}))
    expect_error(
        capsys, ["test", "--config", config, "--ckpt_path", odd], "unknown divmerge checkpoint format"
    )


def test_a_checkpoint_without_a_format_is_format_1_and_resumes(tmp_path, tiny, finished):
    config = write_config(tmp_path, tiny, epochs=2)
    old = rewrite(finished, tmp_path / "old.ckpt", lambda s: s.pop(FORMAT_KEY, None))
    assert FORMAT_KEY not in torch.load(old, weights_only=True)
    train.main(["fit", "--config", config, "--ckpt_path", old])
    resumed = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed[FORMAT_KEY] == CHECKPOINT_FORMAT


def test_the_module_hook_checks_too(tiny):
    """Whatever path Lightning loads a checkpoint by (``best``, ``hpc``, a Trainer call), the hook refuses."""
    module = DivMergeModule(experts=tiny["experts"], base=tiny["base"])
    meta = {"divmerge": {"fingerprint": "x", "tasks": ["alpha", "beta"]}}
    with pytest.raises(DivMergeError, match=r"^The checkpoint was written by a newer divmerge"):
        module.on_load_checkpoint({**meta, FORMAT_KEY: CHECKPOINT_FORMAT + 1})
    nan = {"merged.coefficients.weight": torch.tensor([[0.5], [float("nan")]])}
    with pytest.raises(DivMergeError, match=r"^The checkpoint holds NaN coefficients \(for task 'beta'\)"):
        module.on_load_checkpoint({**meta, "state_dict": nan})
