"""Evolutionary hyper-parameter search, duck-typed over agents (it imports no agent class).

``genes.py`` (RLParameter, HyperparameterConfig and the default gene set), ``selection.py``
(TournamentSelection), ``mutation.py`` (Mutations), ``lineage.py`` (events), ``protocol.py``
(EvolvableAgent: ``get_hp``/``set_hp``, fitness, clone, ...). Named after AgileRL's, so its scripts port
with only their imports changed.

Add a mutation gene: an ``RLParameter`` in ``HyperparameterConfig.default()`` (or in the
``hp_config`` given to Mutations) named after a GRPOConfig field; ``GRPO.set_hp`` validates and applies it.
"""
