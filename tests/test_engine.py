"""The Lightning-free engine: what every caller (module, export, benchmarks) relies on."""

import pytest
import torch

from divmerge.data import TaskSpec
from divmerge.engine import LEARNED, Merger, check_method, choose_merge_mode
from divmerge.errors import DivMergeError
from divmerge.families import FAMILIES, detect_family
from divmerge.families.causal_lm import CausalLM
from divmerge.families.classification import Classification
from divmerge.lightning.datamodule import MergeDataModule
from divmerge.static import STATIC_METHODS


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    """A built engine over the tiny experts, with its teachers cached and loaded."""
    merger = Merger(tiny["base"], tiny["experts"], cache_dir=tmp_path_factory.mktemp("cache"))
    specs = [
        TaskSpec(name=t, source=p, num_unlabelled=12, num_val=0, num_test=8) for t, p in tiny["data"].items()
    ]
    dm = MergeDataModule(specs, tokenizer=tiny["base"], max_length=16, eval_batch_size=8)
    merger.check_data(dm)
    paths = merger.teacher_paths(dm, ("unlabelled", "test"))
    built = merger.build_teachers(dm, paths, torch.device("cpu"))
    merger.load_teachers(dm, paths)
    assert len(built) == 4  # 2 tasks x 2 splits, all new
    return merger, dm


def test_family_detection_and_registry(tiny):
    assert detect_family(tiny["experts"]) is Classification
    assert list(FAMILIES) == ["causal_lm", "classification"]  # the catch-all family is asked last
    assert CausalLM.from_options({}).max_new_tokens == 16


def test_one_hot_merge_has_zero_divergence_to_its_expert(prepared):
    merger, dm = prepared
    for task in merger.task_names:
        one = merger.subset([task], init=1.0)  # theta_0 + 1 * tau_task: the expert itself
        batch = dm.collate([dm.dataset(task, "unlabelled")[i] for i in range(4)])
        loss, per_task = one.step_loss({task: batch})
        assert float(loss) < 1e-8 and set(per_task) == {task}
        far = merger.subset([task], init=-5.0)  # far from the expert
        assert float(far.step_loss({task: batch})[0]) > 1e-5  # tiny random models: small but clear


def test_subset_shares_tensors_and_teachers(prepared):
    merger, _ = prepared
    sub = merger.subset(["beta"], granularity="task")
    name = merger.merged.names[0]
    assert sub.merged.base[name].data_ptr() == merger.merged.base[name].data_ptr()
    assert set(sub.teachers) == {("beta", "unlabelled"), ("beta", "test")}
    assert sub.teachers["beta", "test"] is merger.teachers["beta", "test"]
    assert sub.merged.coefficients().shape == (1, 1)
    with pytest.raises(DivMergeError, match="subset"):
        merger.subset(["gamma"])


def test_evaluate_scores_the_expert_and_each_merge(prepared):
    merger, dm = prepared
    batches = {task: list(dm.eval_loader(task, "test")) for task in merger.task_names}
    one_hot = {
        task: merger.subset([task], init=1.0).learned_params() for task in merger.task_names
    }  # each task's expert as a "merge"
    for task in merger.task_names:
        scores = merger.subset([task]).evaluate({task: batches[task]}, "test", {"merged": one_hot[task]})
        assert scores[task]["merged"] == pytest.approx(scores[task]["expert"])
    static = merger.evaluate(batches, "test", {"merged": merger.static_params("ties")})
    assert set(static["alpha"]) == {"expert", "merged"}


def test_method_names_and_options_are_checked_in_one_place():
    check_method(LEARNED, {})
    check_method("ties", {"density": 0.5})
    with pytest.raises(DivMergeError, match=r"Unknown merge method 'slerp'.*divmerge"):
        check_method("slerp", {})
    with pytest.raises(DivMergeError, match="only apply to static methods"):
        check_method(LEARNED, {"density": 0.5})
    with pytest.raises(DivMergeError, match="Unknown option 'p' for static merge method 'ties'"):
        check_method("ties", {"p": 0.5})
    with pytest.raises(DivMergeError, match="density must be in"):
        check_method("ties", {"density": 2.0})  # values too, before any tensor is merged
    with pytest.raises(DivMergeError, match="Unknown merge method"):
        check_method(LEARNED, {}, learned_ok=False)
    assert set(STATIC_METHODS) == {
        "average",
        "task_arithmetic",
        "ties",
        "dare",
        "tsv_m",
        "iso_c",
        "iso_cts",
        "wudi",
    }


def test_bad_settings_fail_before_loading(tiny):
    with pytest.raises(DivMergeError, match="granularity"):
        Merger(tiny["base"], tiny["experts"], granularity="rows")
    with pytest.raises(DivMergeError, match="objective"):
        Merger(tiny["base"], tiny["experts"], objective="hellinger")
    with pytest.raises(DivMergeError, match="backbone_pass"):
        Merger(tiny["base"], tiny["experts"], backbone_pass="sideways")


def test_a_cache_this_rank_cannot_see_is_refused_in_one_line(prepared, tmp_path):
    """A rank on another node whose cache_dir is local: rank 0 built the files there, this rank finds none."""
    merger, dm = prepared
    paths = merger.teacher_paths(dm, ("unlabelled",))
    assert all(path.exists() for path in paths.values())
    node_local = {key: tmp_path / path.name for key, path in paths.items()}  # the same names, another disk
    with pytest.raises(DivMergeError, match="missing on this rank: use a shared cache_dir"):
        merger.load_teachers(dm, node_local)


@pytest.mark.parametrize(
    "option, numel, sharded, memory, mode",
    [
        ("auto", 135_000_000, False, 24 * 10**9, "whole"),  # SmolLM2 on this machine: 1.1 GB of 6 GB
        ("auto", 7_000_000_000, False, 80 * 10**9, "per_block"),  # 7B on an 80 GB GPU: 56 GB of 20 GB
        ("auto", 135_000_000, True, 24 * 10**9, "per_block"),  # sharded: never a whole merge per rank
        ("whole", 7_000_000_000, True, 80 * 10**9, "whole"),  # a configured mode is kept
        ("per_block", 1_000, False, 24 * 10**9, "per_block"),
    ],
)
def test_auto_merge_mode_merges_per_block_when_sharded_or_when_the_whole_merge_is_large(
    option, numel, sharded, memory, mode
):
    chosen, reason = choose_merge_mode(option, numel, sharded, memory)
    assert chosen == mode and reason.startswith("auto" if option == "auto" else "as configured")
