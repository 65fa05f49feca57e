"""Plumbing with no concept of its own, kept out of the way of the main concepts.

``kv_cache.py`` and ``lora_swap.py`` (faster decoding and update: preallocated KV cache, merged / fused /
bypassed LoRA layers), ``cpu_allocator.py`` (glibc keeps freed memory for reuse on CPU), ``atomic.py``
(crash-safe directory and file writes), ``distributed.py`` (the collectives of data-parallel training,
no-ops in one process).
"""
