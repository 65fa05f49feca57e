"""Safe arithmetic for verifiers: model output is parsed, never ``eval``-ed.

An expression is accepted only if it is made of non-negative integer literals, the binary
operators ``+ - * /`` and parentheses. It is checked in three stages, cheapest first, so every
input (a megabyte of text, 10,000 nested parentheses, ``9**9**9``) is rejected in microseconds:

1. text checks: type, length, allowed characters (ASCII digits, ``+ - * / ( )`` and
   whitespace), parenthesis nesting depth;
2. ``ast.parse(mode="eval")`` and a whitelist of node types, a node count cap and a literal
   size cap;
3. exact :class:`fractions.Fraction` evaluation, with a bit-length cap on every intermediate
   numerator and denominator.

Unary operators are rejected: ``-3 + 5`` and ``+3`` are invalid, so a Countdown answer cannot
create a number the puzzle did not give (``5 - 3`` is fine, and intermediate results may be
negative or fractional: ``(8 / 3) * 3`` is exactly ``8``).

Every rejection raises :class:`UnsafeExpression` with a message naming the rule; division by
zero raises its subclass :class:`DivisionByZero`, which is also a ``ZeroDivisionError``.

>>> evaluate("(44 - 19) + 35")
Fraction(60, 1)
>>> literals("81*1")
[81, 1]
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Limits", "UnsafeExpression", "DivisionByZero", "parse", "evaluate", "literals", "DEFAULT_LIMITS"]

_ALLOWED_CHARS = frozenset("0123456789+-*/() \t\n\r")
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class UnsafeExpression(ValueError):
    """The text is not an allowed arithmetic expression (the message names the rule broken)."""


class DivisionByZero(UnsafeExpression, ZeroDivisionError):
    """The expression divides by zero."""


@dataclass(frozen=True)
class Limits:
    """Size caps checked before and during evaluation."""

    max_chars: int = 256
    """Longest accepted text, in characters (checked before anything else)."""
    max_depth: int = 32
    """Deepest parenthesis nesting (checked by a scan of the text, before parsing)."""
    max_nodes: int = 128
    """Most AST nodes (literals plus operators)."""
    max_bits: int = 256
    """Largest bit length of a literal, and of every intermediate numerator and denominator."""

    def __post_init__(self) -> None:
        for name in ("max_chars", "max_depth", "max_nodes", "max_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()


def _check_text(expr: str, limits: Limits) -> None:
    if not isinstance(expr, str):
        raise UnsafeExpression(f"expression must be a str, got {type(expr).__name__}")
    if len(expr) > limits.max_chars:
        raise UnsafeExpression(f"expression has {len(expr)} characters; at most {limits.max_chars} are allowed")
    bad = next((c for c in expr if c not in _ALLOWED_CHARS), None)
    if bad is not None:
        raise UnsafeExpression(
            f"character {bad!r} is not allowed: use only digits, + - * / ( ) and spaces"
        )
    depth = 0
    for c in expr:
        if c == "(":
            depth += 1
            if depth > limits.max_depth:
                raise UnsafeExpression(f"parentheses nest deeper than {limits.max_depth} levels")
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise UnsafeExpression("unbalanced parentheses: ')' without a matching '('")
    if depth:
        raise UnsafeExpression("unbalanced parentheses: '(' without a matching ')'")


def _check_tree(node: ast.expr, limits: Limits) -> None:
    count = 0
    stack = [node]
    while stack:  # iterative: no recursion on untrusted structure
        current = stack.pop()
        count += 1
        if count > limits.max_nodes:
            raise UnsafeExpression(f"expression has more than {limits.max_nodes} numbers and operators")
        if isinstance(current, ast.BinOp):
            if type(current.op) not in _BINOPS:
                raise UnsafeExpression(
                    f"operator {type(current.op).__name__} is not allowed: use only + - * /"
                )
            stack.extend((current.right, current.left))
        elif isinstance(current, ast.Constant):
            value = current.value
            if type(value) is not int:  # bool is an int subclass; floats/complex/str are out
                raise UnsafeExpression(f"literal {value!r} is not allowed: only whole numbers like 42")
            if value.bit_length() > limits.max_bits:
                raise UnsafeExpression(f"literal has {value.bit_length()} bits; at most {limits.max_bits}")
        elif isinstance(current, ast.UnaryOp):
            raise UnsafeExpression("unary operators (a leading - or +) are not allowed: write a - b, not -b")
        else:
            raise UnsafeExpression(
                f"{type(current).__name__} is not allowed: only numbers, + - * / and parentheses"
            )


def parse(expr: str, limits: Limits = DEFAULT_LIMITS) -> ast.expr:
    """Parse and validate an expression without evaluating it.

    Args:
        expr: The expression text, e.g. ``"(44 - 19) + 35"``.
        limits: Size caps.

    Returns:
        The validated expression node (only ``BinOp`` and integer ``Constant`` nodes).

    Raises:
        UnsafeExpression: naming the rule the text breaks.
    """
    _check_text(expr, limits)
    if not expr.strip():
        raise UnsafeExpression("expression is empty: write an equation like (1 + 2) / 3")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise UnsafeExpression(f"not a valid arithmetic expression ({type(exc).__name__}: {exc})") from None
    _check_tree(tree.body, limits)
    return tree.body


def _checked(value: Fraction, limits: Limits) -> Fraction:
    if value.numerator.bit_length() > limits.max_bits or value.denominator.bit_length() > limits.max_bits:
        raise UnsafeExpression(f"an intermediate result is larger than {limits.max_bits} bits")
    return value


def _eval(node: ast.expr, limits: Limits) -> Fraction:
    # Recursion depth is bounded by max_nodes (checked in parse): 128 by default, far below Python's limit.
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    assert isinstance(node, ast.BinOp)  # guaranteed by _check_tree
    left, right = _eval(node.left, limits), _eval(node.right, limits)
    op = type(node.op)
    if op is ast.Add:
        return _checked(left + right, limits)
    if op is ast.Sub:
        return _checked(left - right, limits)
    if op is ast.Mult:  # operands are within max_bits, so the product costs at most 2 * max_bits
        return _checked(left * right, limits)
    if right == 0:
        raise DivisionByZero("division by zero")
    return _checked(left / right, limits)


def evaluate(expr: str, limits: Limits = DEFAULT_LIMITS) -> Fraction:
    """The exact value of an arithmetic expression.

    Args:
        expr: The expression text, e.g. ``"(44 - 19) + 35"``.
        limits: Size caps.

    Returns:
        The exact value as a :class:`~fractions.Fraction`.

    Raises:
        UnsafeExpression: naming the rule the text breaks.
        DivisionByZero: if it divides by zero (a subclass of both ``UnsafeExpression`` and
            ``ZeroDivisionError``).
    """
    node = parse(expr, limits)
    try:
        return _eval(node, limits)
    except RecursionError:  # only reachable with a max_nodes far above the default
        raise UnsafeExpression("expression nests too deeply to evaluate: lower Limits.max_nodes") from None


def literals(expr: str, limits: Limits = DEFAULT_LIMITS) -> list[int]:
    """The integer literals of an expression, left to right, as the parser reads them.

    Args:
        expr: The expression text, e.g. ``"81*1"``.
        limits: Size caps.

    Returns:
        The literals, e.g. ``[81, 1]``.

    Raises:
        UnsafeExpression: naming the rule the text breaks.
    """
    found: list[int] = []
    stack = [parse(expr, limits)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BinOp):
            stack.extend((node.right, node.left))
        else:
            found.append(node.value)  # type: ignore[attr-defined]
    return found
