"""From prompts to scored completions: the rollout, multi-turn episodes and the generation backends.

``rollout.py`` (Rollout, rollout(), evaluate(): training, fitness and ``llm-gym eval`` share it),
``multi_turn.py`` (MultiTurnEnv and the turn loop), ``backend.py`` (protocol, SamplingConfig, BACKENDS),
``hf.py`` + ``decoding.py`` (the HF backend), ``vllm.py`` (colocated vLLM), ``vllm_server.py`` (a
``vllm serve`` over HTTP; its stand-in for tests is :mod:`llm_gym.lora_server`), ``completions.py`` (tensor formats),
``policies.py`` (oracle and plain-model policies), ``population.py`` + ``population_decode.py`` (a
population's generation and fitness as one batched decode: per-row LoRA over the shared base).

Add a generation backend: a module with ``build(agent, config) -> GenerationBackend`` and one
``BackendSpec`` entry in ``backend.BACKENDS``. Add a multi-turn environment: a class with the members of
:class:`~llm_gym.algorithms.rollout.multi_turn.MultiTurnEnv`; the rollout, training and evaluation take it.
"""
