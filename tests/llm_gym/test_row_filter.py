"""Row filters are parsed and checked, never eval-ed."""

from __future__ import annotations

import pytest

from llm_gym.row_filter import FilterError, compile_filter

COLUMNS = ["correct", "format", "reward", "name", "prompt"]
ROWS = [
    {"correct": True, "format": 1.0, "reward": 2.0, "name": "a"},
    {"correct": True, "format": 0.0, "reward": 1.0, "name": "b"},
    {"correct": False, "format": 1.0, "reward": 1.0, "name": "c"},
    {"correct": False, "format": 0.0, "reward": 0.0, "name": "d"},
]


@pytest.mark.parametrize(
    ("expr", "kept"),
    [
        ("correct and format == 1", "a"),
        ("correct or format == 1", "abc"),
        ("not correct", "cd"),
        ("reward >= 1", "abc"),
        ("0 < reward < 2", "bc"),  # chained comparison
        ("name in ('a', 'd')", "ad"),
        ("name not in ['a', 'd'] and reward > -1", "bc"),
        ("not (correct and format == 1) and reward == 1", "bc"),
        ("correct == True", "ab"),
    ],
)
def test_filters_keep_the_rows_where_the_expression_holds(expr, kept):
    keep = compile_filter(expr, COLUMNS)
    assert "".join(r["name"] for r in ROWS if keep(r)) == kept


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("len(prompt) > 3", "function calls are not allowed"),
        ("__import__('os').system('echo pwned')", "function calls are not allowed"),
        ("correct and formt == 1", "unknown column 'formt'; did you mean 'format'?"),
        ("os", "unknown column 'os'"),
        ("prompt.count", "Attribute is not allowed"),
        ("prompt[0] == 1", "Subscript is not allowed"),
        ("reward + 1 > 2", "BinOp is not allowed"),
        ("(lambda: 1) == 1", "Lambda is not allowed"),
        ("reward is None", "operator Is is not allowed"),
        ("name in (name,)", "a list in a filter holds constants only"),
        ("correct and", "is not an expression"),
        ("[x for x in prompt]", "ListComp is not allowed"),
    ],
)
def test_anything_outside_the_grammar_is_rejected_before_any_row_is_read(expr, message):
    with pytest.raises(FilterError, match="--where") as info:
        compile_filter(expr, COLUMNS)
    assert message in str(info.value)
