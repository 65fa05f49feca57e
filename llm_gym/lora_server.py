"""A stand-in for ``vllm serve MODEL --enable-lora`` with runtime LoRA updating, on the standard library.

It serves a local causal LM behind the endpoints the ``"vllm-server"`` generation backend uses, with
the request and response fields of vLLM's OpenAI-compatible server (as read in vLLM's
``entrypoints/openai`` and ``serve/lora`` source), so that backend can be tested over real HTTP without
a GPU or a vLLM install::

    with LoRAServer(tiny_model_path("tiny"), name="tiny") as server:
        ...  # GRPO(..., backend="vllm-server", backend_config={"base_url": server.base_url})

Endpoints:

* ``POST /v1/completions``: ``prompt`` as token ids (one list, or a list of lists), ``n``,
  ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``top_k`` (0 or -1: off), ``seed``,
  ``stop_token_ids``, ``ignore_eos``, ``logprobs`` (the sampled token's log-prob and the top
  ``logprobs`` others, from the unmodified temperature-1 distribution, as vLLM's default
  ``logprobs_mode="raw_logprobs"``), ``return_tokens_as_token_ids`` (tokens as ``"token_id:N"``) and
  ``return_token_ids`` (``choices[i].token_ids``). Choice ``i`` is completion ``i % n`` of prompt
  ``i // n``. ``model`` is the base model's name or a loaded adapter's; another name gets vLLM's 404.
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter``
  ``{"lora_name"}``: a plain-text 200, or vLLM's errors (a name already loaded: 400; a folder with no
  adapter: 404; a rank above ``max_lora_rank``: 400; unloading an unknown name: 404).
* ``GET /v1/models``: the base model and the loaded adapters.

:meth:`LoRAServer.restart` stops serving, forgets every adapter (as a restarted vLLM does) and serves
again on the same port, optionally after a pause. It is not a production server: requests are
answered one at a time, each prompt decoded by ``transformers``' ``generate``. Use vLLM for real work.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from llm_gym.http_stub import JSONHandler, ThreadedServer

__all__ = ["LoRAServer", "ServerError"]

logger = logging.getLogger(__name__)


class ServerError(Exception):
    """A request the server refuses, answered with ``status`` and vLLM's error body."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """vLLM's error JSON (``{"error": {"message", "type", "code"}}``)."""
        return {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.status}}


class LoRAServer(ThreadedServer):
    """An HTTP server on ``host:port`` (port 0: a free one) serving a causal LM and LoRA adapters loaded at run time.

    Args:
        model: A folder ``transformers`` loads, or a model object (deep-copied: the server never
            shares weights with a trainer).
        name: The base model's served name; default the folder path (``"base"`` for an object).
        tokenizer: A tokenizer for the ``text`` fields; default loaded from ``model``'s folder when
            it has one, else ``text`` is empty.
        max_lora_rank: Adapters of a larger rank are refused (``vllm serve --max-lora-rank``).
        host: Interface to bind.
        port: Port (0 picks a free one; a restart keeps the port).

    Attributes:
        loaded: Every ``lora_name`` ever loaded, in order (restarts included).
        unloaded: Every ``lora_name`` unloaded, in order.
        completions: ``/v1/completions`` requests received (refused ones included).
        bodies: The JSON body of each ``/v1/completions`` request, in order.
        restarts: Times :meth:`restart` ran.
    """

    thread_name = "lora-server"

    def __init__(
        self,
        model: str | Path | Any,
        name: str | None = None,
        *,
        tokenizer: Any | None = None,
        max_lora_rank: int = 64,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, (str, Path)):
            self.name = name or str(model)
            self._base = AutoModelForCausalLM.from_pretrained(str(model)).eval()
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(model))
                except (OSError, ValueError):
                    tokenizer = None
        else:
            self.name = name or "base"
            self._base = copy.deepcopy(model).eval()
        self.tokenizer = tokenizer
        self.max_lora_rank = int(max_lora_rank)
        self.loaded: list[str] = []
        self.unloaded: list[str] = []
        self.completions = 0
        self.bodies: list[dict[str, Any]] = []
        self.restarts = 0
        self._restart_at: tuple[int, float] | None = None
        self._refusing = False  # between a scheduled restart's trigger and the server being back
        self._peft: Any = None  # a PeftModel around _base once an adapter is loaded
        self._adapters: dict[str, tuple[str, str]] = {}  # lora_name -> (PEFT adapter key, folder)
        self._keys = 0
        self._lock = threading.Lock()  # one request at a time touches the model
        self._host = host
        self._server = self._bind(host, port)

    # ------------------------------------------------------------------ serving
    def restart(self, down_for: float = 0.0) -> threading.Thread | None:
        """Restart like a vLLM server: stop, forget every adapter, serve again on the same port.

        Args:
            down_for: Seconds without a listening socket before serving again. With 0 the server is
                back when this returns; otherwise this returns at once and a thread brings it back.

        Returns:
            The thread that brings the server back (join it to wait), or None when ``down_for`` is 0.
        """
        port = self._server.server_address[1]
        self.close()
        with self._lock:
            self._forget_adapters()
            self.restarts += 1

        def back() -> None:
            time.sleep(down_for)
            self._server = self._bind(self._host, port)
            self._refusing = False
            self.start()

        if down_for <= 0:
            back()
            return None
        thread = threading.Thread(target=back, daemon=True, name="lora-server-restart")
        thread.start()
        return thread

    def restart_after(self, completions: int, down_for: float = 0.0) -> None:
        """Restart (as :meth:`restart`) right after answering the ``completions``-th completion request.

        A fault to inject mid-run: the next request finds the server down (for ``down_for`` seconds)
        and then without the adapters it had loaded.
        """
        self._restart_at = (int(completions), float(down_for))

    def _bind(self, host: str, port: int) -> ThreadingHTTPServer:
        server = self

        class Handler(JSONHandler):
            log_name = "lora server"

            def do_GET(self) -> None:  # noqa: N802 - the http.server hook
                if server._refusing:
                    self.close_connection = True
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self.send_json(200, server.models())
                else:
                    self.send_json(404, {"detail": "Not Found"})  # FastAPI's answer to an unknown route

            def do_POST(self) -> None:  # noqa: N802 - the http.server hook
                if server._refusing:  # a restart is under way: answer nothing, like a server going down
                    self.close_connection = True
                    return
                try:
                    body = self.read_json()
                    route = self.path.rstrip("/")
                    if route == "/v1/completions":
                        self.send_json(200, server.complete(body))
                        server._maybe_restart()
                    elif route == "/v1/load_lora_adapter":
                        self.send_json(200, server.load_adapter(body.get("lora_name"), body.get("lora_path")))
                    elif route == "/v1/unload_lora_adapter":
                        self.send_json(200, server.unload_adapter(body.get("lora_name")))
                    else:
                        self.send_json(404, {"detail": "Not Found"})
                except ServerError as err:
                    self.send_json(err.status, err.body())
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass
                except Exception as err:  # noqa: BLE001 - a bug answers 500 (as vLLM does), never a dropped connection
                    logger.exception("lora server: %s failed", self.path)
                    self.send_json(500, ServerError(500, f"{type(err).__name__}: {err}", "InternalServerError").body())

        return self._bind_server(host, port, Handler)

    def _maybe_restart(self) -> None:
        """Start the scheduled restart once its request was answered (see :meth:`restart_after`)."""
        if self._refusing and self._restart_at is not None:
            down_for = self._restart_at[1]
            self._restart_at = None
            # from another thread: shutdown() waits for serve_forever, which this handler's thread is not
            threading.Thread(target=self.restart, args=(down_for,), daemon=True).start()

    # ----------------------------------------------------------------- adapters
    def models(self) -> dict[str, Any]:
        """The ``/v1/models`` body: the base model, then each adapter with the base as its parent."""
        cards = [{"id": self.name, "object": "model", "root": self.name, "parent": None}]
        cards += [{"id": n, "object": "model", "root": path, "parent": self.name}
                  for n, (_, path) in self._adapters.items()]  # fmt: skip
        return {"object": "list", "data": cards}

    def load_adapter(self, lora_name: Any, lora_path: Any) -> str:
        """Load the PEFT adapter saved in ``lora_path`` under ``lora_name``.

        Returns:
            vLLM's success line.

        Raises:
            ServerError: On a missing field, a name already loaded, a folder with no adapter, or a
                rank above ``max_lora_rank``.
        """
        import torch
        from peft import LoraConfig

        if not lora_name or not lora_path:
            raise ServerError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        with self._lock:
            if lora_name in self._adapters:
                raise ServerError(400, f"The lora adapter '{lora_name}' has already been loaded.", "InvalidUserInput")
            folder = Path(lora_path)
            if not (folder / "adapter_config.json").is_file():
                raise ServerError(404, f"Loading lora {lora_name} failed: No adapter found for {lora_path}",
                                  "NotFoundError")  # fmt: skip
            config = LoraConfig.from_pretrained(str(folder))
            if config.r > self.max_lora_rank:
                raise ServerError(400, f"LoRA rank {config.r} is greater than max_lora_rank {self.max_lora_rank}.")
            self._keys += 1
            key = f"lora{self._keys}"  # PEFT adapter names become module keys: no dots, whatever lora_name is
            try:  # PEFT initialises the LoRA layers before loading: keep the process's RNG (a trainer's) untouched
                with torch.random.fork_rng(devices=[]):
                    self._load(folder, key)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                raise ServerError(400, f"Loading lora {lora_name} failed: {err}") from err
            self._adapters[lora_name] = (key, str(folder))
            self.loaded.append(lora_name)
        return f"Success: LoRA adapter '{lora_name}' added successfully."

    def _load(self, folder: Path, key: str) -> None:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._base, str(folder), adapter_name=key).eval()
        else:
            self._peft.load_adapter(str(folder), adapter_name=key)

    def unload_adapter(self, lora_name: Any) -> str:
        """Unload adapter ``lora_name``.

        Returns:
            vLLM's success line.

        Raises:
            ServerError: 404 when no adapter of that name is loaded.
        """
        with self._lock:
            if lora_name not in self._adapters:
                raise ServerError(404, f"The lora adapter '{lora_name}' cannot be found.", "NotFoundError")
            self._drop(lora_name)
            self.unloaded.append(str(lora_name))
        return f"Success: LoRA adapter '{lora_name}' removed successfully."

    def _drop(self, lora_name: str) -> None:
        key, _ = self._adapters.pop(lora_name)
        if not self._adapters:  # PEFT keeps at least one adapter: take the LoRA layers out altogether
            self._base = self._peft.unload()
            self._peft = None
            return
        if key in self._peft.active_adapters:
            self._peft.set_adapter(next(iter(self._adapters.values()))[0])
        self._peft.delete_adapter(key)

    def _forget_adapters(self) -> None:
        for lora_name in list(self._adapters):
            self._drop(lora_name)

    # --------------------------------------------------------------- completions
    def complete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one ``/v1/completions`` request (see the module docstring for the fields).

        Raises:
            ServerError: On an unknown model, a prompt that is not token ids, or a bad field.
        """
        import torch

        with self._lock:
            self.completions += 1
            self.bodies.append(dict(body))
            if self._restart_at is not None and self.completions >= self._restart_at[0]:
                self._refusing = True  # this is the last request answered before the restart
            model = body.get("model") or self.name
            if model != self.name and model not in self._adapters:
                raise ServerError(404, f"The model `{model}` does not exist.", "NotFoundError")
            prompts = _token_prompts(body.get("prompt"))
            n, max_tokens = int(body.get("n") or 1), int(body.get("max_tokens") or 16)
            want_logprobs = body.get("logprobs")
            if n < 1 or max_tokens < 1 or (want_logprobs is not None and int(want_logprobs) < 0):
                raise ServerError(400, "n and max_tokens must be >= 1 and logprobs >= 0")
            stops = [int(t) for t in body.get("stop_token_ids") or []]
            if not body.get("ignore_eos"):
                eos = self._base.generation_config.eos_token_id
                stops += [eos] if isinstance(eos, int) else list(eos or [])
            if not stops:
                stops = [-1]  # no stop id at all: every completion runs to max_tokens
            seed = body.get("seed")
            choices, prompt_tokens, completion_tokens = [], 0, 0
            net = self._select(model)
            with torch.random.fork_rng(devices=[]), torch.no_grad(), net:
                torch.manual_seed(int(seed) if seed is not None else self.completions)
                for p, ids in enumerate(prompts):
                    rows, logps, tops = self._generate(ids, n, max_tokens, body, stops,
                                                       int(want_logprobs or 0))  # fmt: skip
                    prompt_tokens += len(ids)
                    for j, (row, lp, top) in enumerate(zip(rows, logps, tops, strict=True)):
                        completion_tokens += len(row)
                        choice = {"index": p * n + j, "text": self._decode(row),
                                  "finish_reason": "stop" if row and row[-1] in stops else "length",
                                  "stop_reason": row[-1] if row and row[-1] in stops else None}  # fmt: skip
                        if want_logprobs is not None:
                            choice["logprobs"] = self._logprobs(row, lp, top, bool(body.get("return_tokens_as_token_ids")))
                        if body.get("return_token_ids"):
                            choice["token_ids"] = row
                            choice["prompt_token_ids"] = ids
                        choices.append(choice)
        return {
            "id": f"cmpl-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }  # fmt: skip

    def _select(self, model: str) -> Any:
        """A context in which the net runs as ``model``: the base (adapters off) or one adapter."""
        import contextlib

        if self._peft is None:
            return contextlib.nullcontext()
        if model == self.name:
            return self._peft.disable_adapter()
        self._peft.set_adapter(self._adapters[model][0])
        return contextlib.nullcontext()

    def _generate(
        self, ids: list[int], n: int, max_tokens: int, body: Mapping[str, Any], stops: list[int], top: int
    ) -> tuple[list[list[int]], list[list[float]], list[list[dict[int, float]]]]:
        """``n`` completions of one prompt: token ids up to and including the first stop id, their
        temperature-1 log-probs, and per token the ``top`` most likely ids with their log-probs."""
        import torch

        net = self._peft if self._peft is not None else self._base
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0
        top_k = int(body.get("top_k") or 0)
        sample: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if temperature > 0:
            sample = {"do_sample": True, "temperature": temperature, "top_p": float(body.get("top_p") or 1.0),
                      "top_k": top_k if top_k > 0 else 0}  # fmt: skip
        prompt = torch.tensor([ids], dtype=torch.long)  # [1, L]
        out = net.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
            num_return_sequences=n if sample["do_sample"] else 1, eos_token_id=stops, pad_token_id=stops[0] if stops[0] >= 0 else 0,
            output_logits=True, return_dict_in_generate=True, **sample,
        )  # fmt: skip
        generated = out.sequences[:, prompt.shape[1] :]  # [n, C] ([1, C] greedy: n equal rows, as vLLM gives)
        logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # [n, C, V], raw logits
        if not sample["do_sample"]:
            generated, logp = generated.expand(n, -1), logp.expand(n, -1, -1)
        rows, logps, tops = [], [], []
        for g in range(n):
            row = generated[g].tolist()
            end = next((t + 1 for t, tok in enumerate(row) if tok in stops), len(row))
            row = row[:end]
            rows.append(row)
            logps.append([float(logp[g, t, tok]) for t, tok in enumerate(row)])
            if top:
                values, indices = logp[g, :end].topk(top, dim=-1)  # [C, top]
                tops.append([dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)])
            else:
                tops.append([{} for _ in row])
        return rows, logps, tops

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids))) if self.tokenizer is not None else ""

    def _logprobs(
        self, row: list[int], logps: list[float], top: list[dict[int, float]], as_ids: bool
    ) -> dict[str, Any]:
        """The ``logprobs`` object of a choice (OpenAI's completions format)."""

        def name(tok: int) -> str:
            return f"token_id:{tok}" if as_ids else self._decode([tok])

        offsets, at = [], 0
        for tok in row:
            offsets.append(at)
            at += len(name(tok)) if not as_ids else 0
        return {
            "text_offset": offsets,
            "token_logprobs": logps,
            "tokens": [name(t) for t in row],
            "top_logprobs": [{name(t): lp, **{name(k): v for k, v in alts.items()}}
                             for t, lp, alts in zip(row, logps, top, strict=True)],
        }  # fmt: skip


def _token_prompts(prompt: Any) -> list[list[int]]:
    """``prompt`` as a list of token-id lists (vLLM's ``list[int] | list[list[int]]``)."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if (isinstance(prompt, list) and prompt
            and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt)):  # fmt: skip
        return [list(p) for p in prompt]
    raise ServerError(400, "this stand-in server takes prompts as token ids: a list of ints or a list of such lists")
