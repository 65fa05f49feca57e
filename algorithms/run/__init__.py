"""A training run: the loop (``finetune_llm_reasoning``), its checkpoints, elites, logs and plots.

``loop.py`` (rollout -> learn per agent, evaluation, evolution, checkpoints), ``checkpoints.py`` (the whole
population + run state + RNG states, atomically), ``elites.py`` (EliteStore, load_elite),
``loggers.py`` (CSV, TensorBoard, W&B, completion samples), ``plots.py`` (the learning curve),
``distributed.py`` (data-parallel runs: batches sharded over processes, evaluations gathered, process 0 writes).
"""
