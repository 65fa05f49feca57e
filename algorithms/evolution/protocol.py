"""What selection and mutation need from an agent: the :class:`EvolvableAgent` protocol.

The evolutionary search is duck-typed: it never imports the GRPO agent, so any object with these
members evolves (the tests use a dict-backed fake)::

    agent.hps                           # the agent's hyper-parameter record (GRPO: a GRPOConfig)
    agent.get_hp(name) -> value         # one gene's current value; KeyError for an unknown name
    agent.set_hp(name, value) -> None   # applies a new value (optimizer lr, sampler temperature, ...)
    agent.fitness: list[float]          # evaluation history, last = current
    agent.index: int                    # unique id across the run (new clones get new ids)
    agent.lineage: list[dict]           # events, see :mod:`~llm_gym.algorithms.evolution.lineage`
    agent.steps: int                    # training steps done
    agent.mut: str                      # the gene the last mutation changed, or "None" (AgileRL's name)
    agent.clone(index) -> agent         # independent copy (adapter, optimizer, hps, fitness, lineage)
    agent.release() -> None             # optional: frees a discarded agent's adapter
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from llm_gym.algorithms.evolution.genes import Number

__all__ = ["EvolvableAgent"]


@runtime_checkable
class EvolvableAgent(Protocol):
    """The attributes and methods selection and mutation rely on (see the module docstring).

    ``hps`` is typed loosely on purpose: evolution never reads it (genes go through
    :meth:`get_hp` / :meth:`set_hp`), it only checks that a clone does not share it with its parent.
    A GRPO agent's is its :class:`~llm_gym.algorithms.grpo.config.GRPOConfig`.
    """

    hps: Any
    fitness: list[float]
    index: int
    lineage: list[dict[str, Any]]
    steps: int
    mut: str

    def get_hp(self, name: str) -> Any:
        """The current value of gene ``name``; ``KeyError`` when the agent has no such gene."""
        ...

    def set_hp(self, name: str, value: Number) -> None:
        """Apply a new value of gene ``name`` (validated by the agent)."""
        ...

    def clone(self, index: int) -> EvolvableAgent:
        """An independent copy with id ``index``."""
        ...
