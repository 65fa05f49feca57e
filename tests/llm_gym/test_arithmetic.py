"""Safe arithmetic: exact values, every rejection rule, adversarial inputs answered fast."""

from __future__ import annotations

import re
import time
from fractions import Fraction

import pytest

from llm_gym.arithmetic import DivisionByZero, Limits, UnsafeExpression, evaluate, literals, parse


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("(44 - 19) + 35", Fraction(60)),  # 25 + 35
        ("8/3", Fraction(8, 3)),
        ("(8 / 3) * 3", Fraction(8)),  # exact, no float rounding
        ("1 - 2 - 3", Fraction(-4)),  # left associative: (1 - 2) - 3
        ("2 * 3 + 4", Fraction(10)),  # precedence
        ("2 * (3 + 4)", Fraction(14)),
        ("100 / 7 / 2", Fraction(50, 7)),  # (100/7)/2
        ("  7  ", Fraction(7)),
        ("0 / 5", Fraction(0)),
        ("(1 +\n 2)", Fraction(3)),  # newlines are fine inside parentheses
        ("((((((5))))))", Fraction(5)),
        ("1/3 + 1/6", Fraction(1, 2)),
    ],
)
def test_evaluate_exact_values(expr: str, expected: Fraction) -> None:
    value = evaluate(expr)
    assert isinstance(value, Fraction)
    assert value == expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [("81*1", [81, 1]), ("(1+2)*(3-4)/5", [1, 2, 3, 4, 5]), ("0", [0]), ("5 - (5 - 5)", [5, 5, 5])],
)
def test_literals_in_source_order(expr: str, expected: list[int]) -> None:
    assert literals(expr) == expected


@pytest.mark.parametrize(
    ("expr", "rule"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-3 + 5", "unary"),
        ("+3", "unary"),
        ("3 * -1", "unary"),
        ("--3", "unary"),
        ("2**3", "Pow"),
        ("7//2", "FloorDiv"),
        ("7 % 2", "character '%'"),
        ("2^3", "character '^'"),
        ("1.5", "character '.'"),
        ("1e3", "character 'e'"),
        ("x + 1", "character 'x'"),
        ("1_000", "character '_'"),
        ("(1, 2)", "character ','"),
        ("1 < 2", "character '<'"),
        ("[1]", "character '['"),
        ("\u0661 + 1", "character"),  # Arabic-Indic digit one: not an ASCII digit
        ("1\x00", "character"),
        ("(1 + 2", "unbalanced"),
        ("1 + 2)", "unbalanced"),
        (")1(", "unbalanced"),
        ("1 2", "not a valid"),
        ("1 +", "not a valid"),
        ("1 +\n 2", "not a valid"),
        ("01", "not a valid"),
        ("()", "Tuple"),
        ("1/0", "division by zero"),
        ("5 / (3 - 3)", "division by zero"),
    ],
)
def test_rejections_name_the_rule(expr: str, rule: str) -> None:
    with pytest.raises(UnsafeExpression, match=re.escape(rule)):
        evaluate(expr)


def test_division_by_zero_is_both_unsafe_and_zero_division() -> None:
    with pytest.raises(DivisionByZero) as info:
        evaluate("4 / (2 - 2)")
    assert isinstance(info.value, ZeroDivisionError)
    assert isinstance(info.value, ArithmeticError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [5, None, b"1+2", ["1"]])
def test_non_string_rejected(value: object) -> None:
    with pytest.raises(UnsafeExpression, match="must be a str"):
        evaluate(value)  # type: ignore[arg-type]


def test_caps_at_their_edges() -> None:
    assert evaluate("(" * 32 + "1" + ")" * 32) == 1  # depth 32 is the default cap
    with pytest.raises(UnsafeExpression, match="deeper than 32"):
        evaluate("(" * 33 + "1" + ")" * 33)
    assert evaluate("1+" * 63 + "1") == 64  # 64 literals + 63 operators = 127 nodes
    with pytest.raises(UnsafeExpression, match="more than 128"):
        evaluate("1+" * 64 + "1")  # 129 nodes
    assert evaluate(str(2**256 - 1)) == 2**256 - 1  # 256 bits: allowed
    with pytest.raises(UnsafeExpression, match="literal has 257 bits"):
        evaluate(str(2**256))
    big = "99999999999999999999"  # 10**20 - 1: 67 bits
    assert evaluate("*".join([big] * 3)) == (10**20 - 1) ** 3  # 200 bits
    with pytest.raises(UnsafeExpression, match="intermediate result is larger than 256 bits"):
        evaluate("*".join([big] * 4))  # 266 bits
    with pytest.raises(UnsafeExpression, match="intermediate"):
        evaluate("1/" + "/".join([big] * 4))  # the denominator grows past the cap
    with pytest.raises(UnsafeExpression, match="257 characters"):
        evaluate("1" + " " * 256)
    with pytest.raises(UnsafeExpression, match="at most 2"):
        evaluate("1+2", Limits(max_chars=2))


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="max_chars must be a positive int"):
        Limits(max_chars=0)


def test_parse_returns_validated_tree() -> None:
    node = parse("1 + 2")
    assert type(node).__name__ == "BinOp"


_ADVERSARIAL = [
    "35**44**19",
    "2**2**2**2**2",
    "9^9^9",
    "9**9**9**9",
    "(" * 10_000 + "1" + ")" * 10_000,
    "(" * 10_000,
    "1+" * 500_000 + "1",  # a megabyte
    "9" * 10_000,
    "99999999*" * 28 + "9",  # 253 characters of multiplications
    "__import__('os').system('echo hi')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 1",
    "'a' * 10**9",
    "[1] * 10**9",
    "1/0",
    "(((((((((((((((((((((((((((((((1/0)))))))))))))))))))))))))))))))",
]


@pytest.mark.parametrize("expr", _ADVERSARIAL, ids=lambda e: e[:24])
def test_adversarial_inputs_rejected_within_a_second(expr: str) -> None:
    start = time.perf_counter()
    with pytest.raises(UnsafeExpression):
        evaluate(expr)
    try:  # literals() parses but does not evaluate: "1/0" has the literals [1, 0]
        literals(expr)
    except UnsafeExpression:
        pass
    assert time.perf_counter() - start < 1.0


def test_permissive_limits_still_never_leak_recursion_error() -> None:
    huge = Limits(max_chars=10**7, max_depth=10**6, max_nodes=10**7, max_bits=10**6)
    cases = {"(" * 10_000 + "1" + ")" * 10_000: 1, "1+" * 1_500 + "1": 1_501, "1+" * 200_000 + "1": 200_001}
    for expr, expected in cases.items():
        start = time.perf_counter()
        try:
            value = evaluate(expr, huge)
        except UnsafeExpression:
            pass
        else:  # if the parser copes, the value must be right
            assert value == expected
        assert time.perf_counter() - start < 1.0
