"""divmerge.methods: method names parsed by the registries that own their parts."""

import pytest

from divmerge.core.coefficients import GRANULARITIES, parse_space
from divmerge.errors import DivMergeError
from divmerge.methods import MethodName, method_names, parse_method
from divmerge.objectives import OBJECTIVES
from divmerge.static import STATIC_METHODS


def test_static_and_learned_names_parse_into_their_parts():
    assert parse_method("ties") == MethodName("ties", static="ties")
    js = parse_method("js-layer")
    assert (js.static, js.objective, js.granularity, js.space_options, js.start_from) == (
        None,
        "js",
        "layer",
        {},
        None,
    )
    svd = parse_method("js-svd8@tsv_m")
    assert (svd.objective, svd.granularity, svd.space_options, svd.start_from) == (
        "js",
        "svd",
        {"rank": 8},
        "tsv_m",
    )
    assert svd.learned == "js-svd8"


def test_every_listed_name_parses_and_the_list_follows_the_registries():
    names = method_names()
    assert names[: len(STATIC_METHODS)] == list(STATIC_METHODS)
    assert len(names) == len(STATIC_METHODS) + len(OBJECTIVES) * len(GRANULARITIES)
    for name in names:
        assert parse_method(name).name == name


@pytest.mark.parametrize(
    "name",
    [
        "fancy",
        "js-",
        "js-nope",
        "nope-layer",
        "js-svd0",
        "js-layer3",
        "js-layer@",
        "js-layer@nope",
        "ties@tsv_m",
    ],
)
def test_unknown_names_are_refused_in_one_line(name):
    with pytest.raises(DivMergeError) as err:
        parse_method(name)
    assert "\n" not in str(err.value)
    assert repr(name) in str(err.value)


def test_a_caller_may_add_its_own_objective():
    with pytest.raises(DivMergeError):
        parse_method("ceiling-task")
    assert parse_method("ceiling-task", ["ceiling"]).objective == "ceiling"
    assert "ceiling-row" in method_names(["ceiling"])


def test_space_ranks_only_where_the_space_takes_one():
    assert parse_space("svd16") == ("svd", {"rank": 16})
    assert parse_space("row") == ("row", {})
    with pytest.raises(DivMergeError, match="svd<r>"):
        parse_space("row4")
