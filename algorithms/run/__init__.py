"""A training run: the loop (``finetune_llm_reasoning``), its checkpoints, elites, logs and plots.

``loop.py`` (rollout -> learn per agent, evaluation, evolution, checkpoints), ``checkpoints.py`` (the whole
population + run state + RNG states, atomically), ``elites.py`` (EliteStore, load_elite),
``loggers.py`` (CSV, TensorBoard, W&B, completion samples), ``plots.py`` (the learning curve); for the main
job (:mod:`~llm_gym.algorithms.recipe`): ``checks.py`` (a train config checked before any work), ``warmup.py``
(the SFT warm-up and its cache), ``resume.py`` (resume points), ``report.py`` (the summary table),
``distributed.py`` (data-parallel runs: batches sharded over processes, evaluations gathered, process 0 writes).
"""
