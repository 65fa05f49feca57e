"""Genes of the evolutionary search: the mutable hyper-parameters of an agent and their ranges.

:class:`RLParameter` is one gene (a range, a type, linear or log scale), :class:`HyperparameterConfig` the
set a population evolves, :func:`mutate_value` one perturbation. Named after AgileRL's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["HyperparameterConfig", "Number", "RLParameter", "mutate_value"]

Number = float | int


# --------------------------------------------------------------------------------------------------
# Genes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLParameter:
    """Range and type of one mutable hyper-parameter.

    Attributes:
        min: Smallest value a mutation may produce (inclusive).
        max: Largest value a mutation may produce (inclusive); must be greater than ``min``.
        dtype: ``float`` or ``int``. Integer genes are rounded after mutation and always move by at
            least one unit in the direction of the noise, so a small ``mutation_sd`` cannot leave
            them stuck (``2 * 1.1`` would otherwise round back to 2).
        log_scale: Perturb in log space, ``new = old * exp(noise)`` instead of
            ``old * (1 + noise)``: right for scale parameters such as the learning rate, where a
            step up and the same step down should be equally likely. Needs ``min > 0``.
    """

    min: float
    max: float
    dtype: type = float
    log_scale: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in (float, int):
            raise ValueError(f"RLParameter dtype={self.dtype!r} is not supported: use float or int.")
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError(f"RLParameter range [{self.min}, {self.max}] must be finite numbers.")
        if not self.min < self.max:
            raise ValueError(
                f"RLParameter min={self.min} must be smaller than max={self.max}: swap or widen them."
            )
        if self.log_scale and self.min <= 0:
            raise ValueError(
                f"RLParameter min={self.min} with log_scale=True: a log-scale gene needs min > 0 "
                "(use a small positive min such as 1e-6, or log_scale=False)."
            )
        if self.dtype is int and (self.min != int(self.min) or self.max != int(self.max)):
            raise ValueError(
                f"RLParameter with dtype=int needs integer bounds, got [{self.min}, {self.max}]."
            )

    def clip(self, value: float) -> Number:
        """Clip ``value`` into ``[min, max]`` and cast it to ``dtype``.

        Args:
            value: Candidate value.

        Returns:
            The clipped value, an ``int`` for integer genes (rounded half up) else a ``float``.
        """
        clipped = min(max(float(value), self.min), self.max)
        if self.dtype is int:
            return int(math.floor(clipped + 0.5))
        return clipped


def mutate_value(param: RLParameter, old: Number, noise: float) -> Number:
    """Perturb one gene value with a given noise draw (the pure core of a mutation).

    ``new = old * (1 + noise)`` (or ``old * exp(noise)`` for log-scale genes), then an integer gene
    moves at least one unit in the sign of ``noise``, and the result is clipped into the range.

    Args:
        param: The gene's range and type.
        old: Current value.
        noise: A draw from ``N(0, mutation_sd)``.

    Returns:
        The new value, of the gene's dtype and inside ``[param.min, param.max]``.

    Examples:
        >>> mutate_value(RLParameter(0.05, 0.5), 0.2, 0.5)
        0.30000000000000004
        >>> mutate_value(RLParameter(2, 32, dtype=int), 2, 0.1)
        3
    """
    old_f = float(old)
    if param.log_scale:
        if old_f <= 0:
            raise ValueError(
                f"Cannot mutate value {old!r} in log space: log-scale genes need a positive value."
            )
        candidate = old_f * math.exp(noise)
    else:
        candidate = old_f * (1.0 + noise)
    if param.dtype is int:
        rounded = math.floor(candidate + 0.5)
        if noise > 0 and rounded <= old_f:
            rounded = math.floor(old_f) + 1
        elif noise < 0 and rounded >= old_f:
            rounded = math.ceil(old_f) - 1
        candidate = rounded
    return param.clip(candidate)


class HyperparameterConfig(Mapping[str, RLParameter]):
    """The set of genes a population evolves: an ordered, read-only mapping ``name -> RLParameter``.

    Args:
        **params: One :class:`RLParameter` per hyper-parameter name, e.g.
            ``HyperparameterConfig(lr=RLParameter(1e-5, 1e-2, log_scale=True))``.

    Raises:
        ValueError: If no gene is given, a value is not an :class:`RLParameter`, or ``group_size``
            allows fewer than 2 completions per prompt (GRPO advantages need a group).
    """

    def __init__(self, **params: RLParameter) -> None:
        if not params:
            raise ValueError("HyperparameterConfig needs at least one gene, e.g. lr=RLParameter(...).")
        for name, param in params.items():
            if not isinstance(param, RLParameter):
                raise ValueError(
                    f"HyperparameterConfig gene {name!r} is {param!r}: wrap it as "
                    f"RLParameter(min=..., max=...)."
                )
        group = params.get("group_size")
        if group is not None and (group.dtype is not int or group.min < 2):
            raise ValueError(
                f"group_size gene {group} must be dtype=int with min >= 2: group-relative "
                "advantages of a single completion are always 0."
            )
        self._params = dict(params)

    @classmethod
    def default(cls) -> HyperparameterConfig:
        """The genes and ranges of LoRA GRPO on small models: the one default gene set of the project.

        Ranges measured on the embedded tiny model (DESIGN.md, benchmarks/README.md): lr 5e-3
        collapsed it to max-length output, so ``lr`` stops at 3e-3; ``temperature`` below 0.5 left
        groups without variance. ``llm-gym train`` uses this set (without ``beta`` when it starts at 0,
        :func:`~llm_gym.algorithms.recipe.mutation_genes`).

        Returns:
            ``lr`` in [1e-5, 3e-3] (log scale), ``beta`` (KL weight) in [1e-4, 0.5] (log scale),
            ``clip_coef`` in [0.05, 0.5], ``temperature`` in [0.5, 1.5] and ``group_size`` (int)
            in [2, 16].
        """
        return cls(
            lr=RLParameter(1e-5, 3e-3, log_scale=True),
            beta=RLParameter(1e-4, 0.5, log_scale=True),
            clip_coef=RLParameter(0.05, 0.5),
            temperature=RLParameter(0.5, 1.5),
            group_size=RLParameter(2, 16, dtype=int),
        )

    def without(self, *names: str) -> HyperparameterConfig:
        """The same genes, in order, without ``names``.

        Raises:
            ValueError: If a name is not a gene, or no gene would be left.
        """
        unknown = [n for n in names if n not in self._params]
        if unknown:
            raise ValueError(f"HyperparameterConfig has no gene {unknown[0]!r}; genes are {self.names()}")
        return HyperparameterConfig(**{n: p for n, p in self._params.items() if n not in names})

    def __getitem__(self, name: str) -> RLParameter:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"HyperparameterConfig({inner})"

    def names(self) -> list[str]:
        """Gene names in declaration order."""
        return list(self._params)
