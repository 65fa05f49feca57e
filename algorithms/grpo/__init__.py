"""The GRPO agent: a LoRA adapter on a causal LM, trained with group-relative policy optimisation.

``config.py`` (GRPOConfig) -> ``agent.py`` (GRPO) -> ``update.py`` (one update) -> ``loss.py`` (the loss
variants) / ``logps.py`` (log-probs); ``model.py`` (loading, adapters), ``checkpoint.py`` (an agent's
files), ``population.py`` (agents on one base).

Add a loss variant: one :class:`~llm_gym.algorithms.grpo.loss.LossVariant` entry in ``loss.LOSS_VARIANTS``
(its surrogate, normaliser and batch share).
"""
