"""Seeded fuzzing of the shipped configs through the parse and validation path (no training).

Each example takes a shipped YAML and mutates it (a wrong type, a missing or unknown key, an
out-of-range value, wrong nesting, a tab, an empty file, a cut in the middle). Whatever the mutation,
``train.py fit`` must end in exit 0 or in exit 2 with one ``divmerge: error:`` line, never a traceback.
The subcommand itself is replaced by a no-op, so what runs is parsing, instantiation of the trainer,
model and data module, and divmerge's own checks of them.
"""

import contextlib
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.cli import LightningCLI

import train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EXAMPLES = 320
OUTCOMES: dict[str, int] = {}

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a nested YAML value (dict keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths(value, (*prefix, i))
    return found


def parent_of(config: dict, path: tuple) -> tuple[object, object]:
    node = config
    for key in path[:-1]:
        node = node[key]
    return node, path[-1]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str]:
    """(kind, the mutated config's text)."""
    source = draw(st.sampled_from(CONFIGS))
    text = source.read_text()
    kind = draw(st.sampled_from(["type", "missing", "unknown", "range", "nesting", "tab", "empty", "cut"]))
    if kind == "empty":
        return kind, draw(st.sampled_from(["", "\n", "# nothing\n", "{}\n", "[]\n", "null\n"]))
    if kind == "cut":
        return kind, text[: draw(st.integers(min_value=1, max_value=len(text) - 1))]
    if kind == "tab":
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        lines[i] = "\t" + lines[i]
        return kind, "".join(lines)
    config = yaml.safe_load(text)
    path = draw(st.sampled_from(paths(config)))
    node, key = parent_of(config, path)
    if kind == "type":
        node[key] = draw(VALUES)
    elif kind == "missing":
        del node[key]
    elif kind == "unknown":
        target = next(n for n in (node[key], node, config) if isinstance(n, dict))
        target[draw(st.sampled_from(["lr_", "epochs", "modle", "granularty", "x"]))] = draw(VALUES)
    elif kind == "range":
        node[key] = draw(st.sampled_from([0, -1, -0.5, 1e30, 2**63, float("nan"), float("inf"), 1e-40]))
    else:  # nesting
        node[key] = draw(st.sampled_from([{"value": node[key]}, [node[key]], {"init_args": node[key]}]))
    return kind, yaml.safe_dump(config, sort_keys=False)


@pytest.fixture
def no_run(monkeypatch, tmp_path):
    monkeypatch.setattr(LightningCLI, "_run_subcommand", lambda self, subcommand: None)
    monkeypatch.chdir(tmp_path)  # the configs' relative run directories land here
    return tmp_path


def run(config_text: str, directory: Path) -> tuple[int, str]:
    path = directory / "fuzzed.yaml"
    path.write_text(config_text)
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            train.main(["fit", "--config", str(path)])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code, err.getvalue()


@settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same mutations on every run (and in CI)
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutated())
def test_a_mutated_config_ends_in_exit_0_or_one_line(case, no_run):
    kind, text = case
    code, err = run(text, no_run)
    assert "Traceback" not in err, (kind, text, err)
    errors = [line for line in err.splitlines() if line.startswith("divmerge: error:")]
    if code == 0:
        assert not errors, (kind, err)
    else:
        assert code == 2 and len(errors) == 1, (kind, code, text, err)
        assert "usage:" not in err, (kind, err)  # no jsonargparse usage dump
    outcome = f"{kind}: exit {code}"
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def test_the_fuzzer_ran_every_kind_and_both_outcomes():
    """Reads the counts of the test above (pytest runs a file's tests in order)."""
    if not OUTCOMES:
        pytest.skip("run with the fuzz test above")
    print("config fuzzing outcomes:", dict(sorted(OUTCOMES.items())))
    assert sum(OUTCOMES.values()) >= 300
    kinds = {key.split(":")[0] for key in OUTCOMES}
    assert kinds == {"type", "missing", "unknown", "range", "nesting", "tab", "empty", "cut"}, kinds
    assert any(key.endswith("exit 0") for key in OUTCOMES) and any(key.endswith("exit 2") for key in OUTCOMES)
