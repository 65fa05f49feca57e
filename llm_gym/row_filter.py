"""Safe row filters such as ``correct and format == 1``: parsed with ``ast``, never ``eval``-ed.

The grammar is a whitelist: column names, constants (numbers, strings, ``True``/``False``/``None``),
tuples or lists of constants (for ``in``), comparisons (``== != < <= > >= in not in``), ``and``,
``or``, ``not`` and unary minus. Anything else (a function call, an attribute, a subscript, an
arithmetic operator, a lambda...) is rejected before any row is seen, as is a name that is not a
column; the error names the fix.
"""

from __future__ import annotations

import ast
import difflib
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["FilterError", "compile_filter"]

_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}  # fmt: skip

_OPERATORS = "column names, constants, comparisons (== != < <= > >= in, not in), and, or, not"


class FilterError(ValueError):
    """The expression is not a valid filter (message names the fix)."""


def _check(node: ast.AST, columns: Sequence[str], expr: str) -> None:
    if isinstance(node, ast.Expression):
        _check(node.body, columns, expr)
    elif isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
        for value in node.values:
            _check(value, columns, expr)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        _check(node.operand, columns, expr)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise FilterError(f"--where {expr!r}: operator {type(op).__name__} is not allowed; use {_OPERATORS}")
        for sub in (node.left, *node.comparators):
            _check(sub, columns, expr)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            if not isinstance(elt, ast.Constant):
                raise FilterError(f"--where {expr!r}: a list in a filter holds constants only")
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, bool, type(None))):
            raise FilterError(f"--where {expr!r}: constant {node.value!r} is not allowed")
    elif isinstance(node, ast.Name):
        if node.id not in columns:
            near = difflib.get_close_matches(node.id, columns, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise FilterError(f"--where {expr!r}: unknown column {node.id!r}; {hint}columns: {', '.join(columns)}")
    elif isinstance(node, ast.Call):
        raise FilterError(f"--where {expr!r}: function calls are not allowed; use {_OPERATORS}")
    else:
        raise FilterError(f"--where {expr!r}: {type(node).__name__} is not allowed; use {_OPERATORS}")


def _value(node: ast.AST, row: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_value(v, row) for v in node.values)
        return any(_value(v, row) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        value = _value(node.operand, row)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.Compare):
        left = _value(node.left, row)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _value(comparator, row)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(e.value for e in node.elts)  # type: ignore[attr-defined]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return row[node.id]
    raise AssertionError(f"unchecked node {type(node).__name__}")  # _check rejected every other node


def compile_filter(expr: str, columns: Sequence[str]) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over rows from a filter expression, checked against the columns first.

    >>> keep = compile_filter("correct and format == 1", ["correct", "format", "reward"])
    >>> keep({"correct": True, "format": 1.0, "reward": 2.0}), keep({"correct": True, "format": 0.0, "reward": 1.0})
    (True, False)
    >>> try:
    ...     compile_filter("len(prompt) > 3", ["prompt"])
    ... except FilterError as err:
    ...     print(str(err)[:57])
    --where 'len(prompt) > 3': function calls are not allowed

    Args:
        expr: The expression.
        columns: The dataset's column names.

    Returns:
        ``keep(row) -> bool``.

    Raises:
        FilterError: a syntax error, a name that is not a column, or a construct outside the grammar.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as err:
        raise FilterError(f"--where {expr!r} is not an expression ({err.msg}); e.g. \"correct and format == 1\"") from None
    _check(tree, list(columns), expr)
    return lambda row: bool(_value(tree.body, row))
