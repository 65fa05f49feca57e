"""The ``"vllm-server"`` backend: generation through an OpenAI-compatible vLLM server, LoRA adapters loaded by name.

The server runs apart from the trainer (another GPU, another machine), started with runtime LoRA
updating on::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank 16 --max-loras 4

and the agent points at it: ``GRPO(MODEL, backend="vllm-server",
backend_config=VLLMServerConfig(base_url="http://HOST:8000/v1"))``. The trainer keeps its own copy
of the base (for the update); the server never sees the base change, only adapters:

* **Sync.** When an adapter changed, it is saved as a plain PEFT folder under
  ``VLLMServerConfig.adapter_dir`` (which the server must be able to read) and loaded with ``POST
  /v1/load_lora_adapter {"lora_name", "lora_path"}`` under a FRESH name (``<prefix>-<adapter>-<k>``):
  vLLM refuses to load a name twice and caches adapters by name, so a new name is what makes it
  read the new weights. The previous name is then unloaded (``/v1/unload_lora_adapter``) and its
  folder deleted. Every population member has its own adapter, hence its own served name.
* **Generation.** One ``POST /v1/completions`` per adapter with every prompt as token ids
  (``prompt: [[ids], ...]``), ``n = G``, the agent's EOS ids as ``stop_token_ids`` (``ignore_eos``),
  a seed drawn from torch's RNG (so ``torch.manual_seed`` repeats a run; ``seed_requests=False`` to
  leave it to the server), and
  ``return_token_ids`` (recent vLLM releases) plus ``logprobs=1`` with ``return_tokens_as_token_ids``, so the
  completion's token ids come back exactly, never re-tokenised from text (from the ``token_id:N``
  log-prob tokens on servers without ``return_token_ids``). The sampled tokens' log-probs are kept in
  :attr:`VLLMServerBackend.last_logprobs`, in the server's ``--logprobs-mode`` (vLLM's default
  ``raw_logprobs`` is at temperature 1; the trainer scores at the agent's temperature, so for
  ``GRPOConfig.vllm_importance_sampling_correction`` with a temperature other than 1 start the server
  with ``--logprobs-mode processed_logprobs``). A population's requests go out concurrently.
* **Restarts.** A refused or dropped connection or a 502/503/504 is retried with backoff for up to
  ``restart_wait`` seconds. A restarted server has forgotten its runtime adapters: the completion
  request's 404 for the unknown adapter name makes the backend load that adapter again (from its
  saved folder, under a fresh name) and resend the request.

Verified only against :class:`llm_gym.lora_server.LoRAServer`, a stand-in that follows vLLM's
fields as read in its source; never against a real ``vllm serve``.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_gym.algorithms.rollout.adapter_sync import AdapterSync, save_adapter
from llm_gym.algorithms.rollout.backend import (
    AdapterBatch,
    GenerationOutput,
    SamplingConfig,
)
from llm_gym.algorithms.rollout.completions import split_completions
from llm_gym.algorithms.rollout.vllm import fit_batch  # the budget rule of both vLLM backends
from llm_gym.algorithms.rollout.vllm_engine import check_lora_config

__all__ = ["ServerUnreachable", "VLLMServerBackend", "VLLMServerConfig", "build_vllm_server_backend"]

logger = logging.getLogger(__name__)

SERVE_HINT = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank R"
_RETRY_STATUS = (502, 503, 504)


class ServerUnreachable(ConnectionError):
    """The server did not answer (refused, dropped, timed out, 502/503/504) for ``restart_wait`` seconds."""


@dataclass(frozen=True)
class VLLMServerConfig:
    """Where the vLLM server is and how to talk to it.

    Attributes:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1`` (required).
        api_key: Sent as ``Authorization: Bearer`` when the server was started with ``--api-key``.
        adapter_dir: Folder the adapters are saved in for the server to read: on a remote server,
            a path both machines see (a shared file system). Default: a temporary folder, which
            only a server on the same machine can read.
        name_prefix: Prefix of the served adapter names; default ``llmgym-<6 random hex>``, so two
            runs sharing one server never load the same name.
        timeout: Seconds one HTTP request may take (a long generation included).
        restart_wait: Seconds to keep retrying a server that does not answer (restarting) before
            giving up.
        logprobs: Keep the sampled tokens' log-probs of the last call (:attr:`VLLMServerBackend.last_logprobs`).
        concurrency: Requests in flight at once when a population generates together.
        seed_requests: Send each request a seed drawn from torch's RNG, so ``torch.manual_seed``
            repeats a run on an unchanged server. vLLM seeds every prompt of a request with it, so
            two identical prompts in one batch then get identical completions; set False to leave
            sampling to the server's own randomness.
    """

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    adapter_dir: str | None = None
    name_prefix: str | None = None
    timeout: float = 600.0
    restart_wait: float = 300.0
    logprobs: bool = True
    concurrency: int = 8
    seed_requests: bool = True

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.restart_wait < 0 or self.concurrency < 1:
            raise ValueError(f"VLLMServerConfig needs timeout > 0, restart_wait >= 0 and concurrency >= 1, got "
                             f"timeout={self.timeout}, restart_wait={self.restart_wait}, "
                             f"concurrency={self.concurrency}")  # fmt: skip


class _HTTPError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {_message(body)}")
        self.status = status
        self.body = body


def _message(body: Any) -> str:
    """The error message of a vLLM / FastAPI error body (``{"error": {"message"}}``, ``{"message"}``, ``{"detail"}``)."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            return str(inner.get("message") or inner.get("detail") or body.get("detail") or body)
        return str(inner)
    return str(body)


@dataclass
class _Loaded:
    """One served version of an adapter: its name on the server and its folder (renamed on a re-load)."""

    lora_name: str
    folder: Path


class VLLMServerBackend:
    """Generation through a vLLM server's ``/v1/completions``, one served LoRA name per adapter.

    Args:
        agent: The GRPO agent that builds it; its clones share the model, and this backend.
        config: Where the server is.

    Attributes:
        served_model: The server's base model name (from ``/v1/models``).
        last_logprobs: With ``config.logprobs``: per batch of the last call, per prompt a float
            tensor shaped like its action mask, the sampled tokens' log-probs where the mask is True.

    Raises:
        ValueError: Without ``config.base_url``, on a ``LoraConfig`` vLLM cannot serve (DoRA,
            ``modules_to_save``, ...), or when ``base_url`` is not a vLLM API root.
        ServerUnreachable: If the server does not answer ``GET /v1/models``.
    """

    def __init__(self, agent: Any, config: VLLMServerConfig) -> None:
        if not config.base_url:
            raise ValueError(
                "backend='vllm-server' needs the server's address: backend_config=VLLMServerConfig("
                f"base_url='http://HOST:8000/v1') for a server started with `{SERVE_HINT}`"
            )
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.pad_token_id = agent.pad_token_id
        self.eos_token_ids = list(agent.eos_token_ids)
        self.max_model_len = agent.max_model_len
        check_lora_config(agent.model.peft_config[agent.adapter_name])  # what vLLM cannot serve, before any request
        try:
            models = self._request("GET", "/models", None, wait=False)
        except _HTTPError as err:
            raise ValueError(f"the server at {self.base_url} answered GET /models with {err}: base_url must be the "
                             "API root (http://HOST:8000/v1), and api_key the server's --api-key if it has one") from None
        if not isinstance(models, Mapping):
            raise ValueError(f"the server at {self.base_url} answered GET /models with {str(models)[:80]!r}, not "
                             "OpenAI's model list: base_url must be a vLLM server's API root (http://HOST:8000/v1)")
        cards = models.get("data") or [{}]
        self.served_model = str(next((c for c in cards if not c.get("parent")), cards[0]).get("id", ""))
        self.prefix = config.name_prefix or f"llmgym-{secrets.token_hex(3)}"
        if config.adapter_dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="llm_gym_vllm_server_"))
        else:  # a folder of this run's own inside the shared one
            self._dir = Path(config.adapter_dir) / self.prefix
            self._dir.mkdir(parents=True, exist_ok=True)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._adapters = AdapterSync(agent.model, self._load_version, self._unload)
        self._next = 1
        self._lock = threading.Lock()  # sync and re-loads from concurrent requests
        self._closed = False
        self._warned: set[str] = set()
        self.last_logprobs: list[list[Tensor]] | None = None
        logger.info("vllm-server backend: %s serves %r; adapters saved under %s", self.base_url, self.served_model,
                    self._dir)  # fmt: skip

    # ------------------------------------------------------------------- HTTP
    def _request(self, method: str, route: str, body: Mapping[str, Any] | None, *, wait: bool = True) -> Any:
        """One request, retried while the server does not answer (for ``restart_wait`` seconds when ``wait``).

        Returns:
            The parsed JSON body, or the text of a plain-text answer.

        Raises:
            _HTTPError: On an HTTP error other than 502/503/504.
            ServerUnreachable: When the server did not answer in time.
        """
        url = self.base_url + route
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        deadline = time.monotonic() + (self.config.restart_wait if wait else 0.0)
        delay, warned = 0.05, False
        while True:
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:  # noqa: S310 - the user's URL
                    text = resp.read().decode()
                return _parse(text)
            except urllib.error.HTTPError as err:
                parsed = _parse(err.read().decode(errors="replace"))
                if err.code not in _RETRY_STATUS:
                    raise _HTTPError(err.code, parsed) from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
                reason = str(getattr(err, "reason", err)) or type(err).__name__
            if time.monotonic() + delay > deadline:
                fix = (f"start it with `{SERVE_HINT}` or fix VLLMServerConfig.base_url" if not wait
                       else "check that it is running, or raise VLLMServerConfig.restart_wait")  # fmt: skip
                raise ServerUnreachable(f"cannot reach the vLLM server at {self.base_url} ({reason}"
                                        f"{f' for {self.config.restart_wait:g} s' if wait else ''}): {fix}")  # fmt: skip
            if not warned:
                logger.warning("vLLM server at %s does not answer (%s): retrying for up to %g s", self.base_url,
                               reason, self.config.restart_wait)  # fmt: skip
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 2.0)

    # ----------------------------------------------------------------- adapters
    def sync(self, agent: Any) -> None:
        """Save the agent's adapter and load it into the server now, under a fresh name.

        Raises:
            RuntimeError: If the server refuses the adapter (the message names the fix).
            ServerUnreachable: If the server does not answer.
        """
        self._check_open()
        with self._lock:
            self._adapters.serve(agent.model, agent.adapter_name)

    @property
    def served_names(self) -> dict[str, str]:
        """By adapter, the name its current version is served under."""
        return {name: served.handle.lora_name for name, served in self._adapters.served.items()}

    def _load_version(self, model: Any, name: str) -> _Loaded:
        """Save adapter ``name`` under a fresh served name and load it into the server (lock held)."""
        lora_name = self._fresh_name(name)
        folder = save_adapter(model, name, self._dir / lora_name)
        self._load(lora_name, folder)
        return _Loaded(lora_name, folder)

    def _fresh_name(self, name: str) -> str:
        lora_name = f"{self.prefix}-{name}-{self._next}"
        self._next += 1
        return lora_name

    def _load(self, lora_name: str, folder: Path) -> None:
        try:
            self._request("POST", "/load_lora_adapter", {"lora_name": lora_name, "lora_path": str(folder)})
        except _HTTPError as err:
            raise RuntimeError(_load_error(self.base_url, folder, err)) from None

    def _unload(self, served: _Loaded) -> None:
        """Unload a name the backend no longer uses, and delete its folder (a 404: already gone)."""
        try:
            self._request("POST", "/unload_lora_adapter", {"lora_name": served.lora_name})
        except _HTTPError as err:
            if err.status != 404:
                logger.warning("vLLM server did not unload %s (%s)", served.lora_name, err)
        except ServerUnreachable as err:
            logger.warning("could not unload %s: %s", served.lora_name, err)
        shutil.rmtree(served.folder, ignore_errors=True)

    def _reload(self, name: str, lost: str) -> str:
        """Load adapter ``name`` again after the server lost ``lost`` (a restart); returns the name to use."""
        with self._lock:
            served = self._adapters.served[name].handle
            if served.lora_name != lost:  # another request already re-loaded it
                return served.lora_name
            lora_name = self._fresh_name(name)
            folder = served.folder.rename(self._dir / lora_name)
            logger.warning("vLLM server forgot adapter %s (restarted?): loading %r again as %s", lost, name, lora_name)
            self._load(lora_name, folder)
            served.lora_name, served.folder = lora_name, folder
            return lora_name

    def _ensure_served(self, name: str) -> str:
        """The served name of adapter ``name``, syncing it first if it is new or changed since."""
        with self._lock:
            return self._adapters.current(name).lora_name

    # --------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[dict[str, Any]], sampling: SamplingConfig, adapter_name: str = "default"
    ) -> GenerationOutput:
        """Generate with the named adapter: one ``/v1/completions`` request for all prompts.

        Args:
            prompts: The environment's prompts.
            sampling: Decoding settings.
            adapter_name: Whose adapter to use (synced first if it changed or was never synced).

        Returns:
            The :class:`GenerationOutput`, in the same format as the HF backend.

        Raises:
            KeyError: If the model has no such adapter.
            RuntimeError: If the server refuses the request or answers without token ids.
            ServerUnreachable: If the server does not answer for ``restart_wait`` seconds.
        """
        return self.generate_batches([AdapterBatch(adapter_name, prompts, sampling)])[0]

    def generate_batches(self, batches: Sequence[AdapterBatch]) -> list[GenerationOutput]:
        """Generate for several adapters (a population): one request per adapter, sent concurrently.

        Args:
            batches: Per adapter its prompts and decoding settings.

        Returns:
            One :class:`GenerationOutput` per batch, in order.

        Raises:
            ValueError: If there are no batches.
            RuntimeError: After :meth:`close`, or as :meth:`generate`.
        """
        self._check_open()
        if not batches:
            raise ValueError("got no batches: pass one AdapterBatch per adapter")
        jobs = []
        for batch in batches:
            ids, sampling = fit_batch(batch, self.pad_token_id, self.max_model_len, self._warned)
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from torch's RNG: manual_seed repeats a run
            jobs.append((batch.adapter_name, self._ensure_served(batch.adapter_name), ids, sampling, seed))
        if len(jobs) == 1:
            answers = [self._complete(*jobs[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(jobs))) as pool:
                answers = list(pool.map(lambda job: self._complete(*job), jobs))
        results, logps = [], []
        for (_, _, ids, sampling, _), (rows, row_logps) in zip(jobs, answers, strict=True):
            out = split_completions(ids, rows, sampling.group_size, eos_token_ids=self.eos_token_ids,
                                    pad_token_id=self.pad_token_id)  # fmt: skip
            results.append(out)
            logps.append(_rollout_logprobs(ids, out.action_masks, row_logps, sampling.group_size))
        self.last_logprobs = logps if self.config.logprobs else None
        return results

    def _body(self, lora_name: str, ids: Sequence[Tensor], sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": lora_name, "prompt": [i.tolist() for i in ids], "n": sampling.group_size,
            "max_tokens": sampling.max_new_tokens, "stop_token_ids": self.eos_token_ids, "ignore_eos": True,
            "skip_special_tokens": False, "return_token_ids": True,
            # the token ids again, as "token_id:N" log-prob tokens (servers before return_token_ids); with
            # logprobs=1 (0 reads as "no log-probs" on older vLLM) also each sampled token's log-prob
            "logprobs": 1, "return_tokens_as_token_ids": True,
        }  # fmt: skip
        if self.config.seed_requests:
            body["seed"] = seed
        if sampling.greedy:
            body["temperature"] = 0.0  # greedy in vLLM
        else:
            body["temperature"] = sampling.temperature
            if sampling.top_p < 1.0:
                body["top_p"] = sampling.top_p
            if sampling.top_k > 0:
                body["top_k"] = sampling.top_k
        return body

    def _complete(
        self, name: str, lora_name: str, ids: Sequence[Tensor], sampling: SamplingConfig, seed: int
    ) -> tuple[list[list[int]], list[list[float] | None]]:
        """One completion request: per completion (prompt-major) its token ids and log-probs."""
        for attempt in range(3):
            try:
                answer = self._request("POST", "/completions", self._body(lora_name, ids, sampling, seed))
                break
            except _HTTPError as err:
                if err.status != 404 or "does not exist" not in _message(err.body) or attempt == 2:
                    raise RuntimeError(f"the vLLM server at {self.base_url} refused a completion request for "
                                       f"{lora_name} ({err})") from None  # fmt: skip
                lora_name = self._reload(name, lora_name)  # 404: the server lost the adapter (it restarted)
        return _read_choices(answer, len(ids) * sampling.group_size, self.base_url)

    # ------------------------------------------------------------------ phases
    def sleep(self) -> None:
        """Nothing to release: the server holds its own GPU."""

    def wake_up(self) -> None:
        """Nothing to restore (see :meth:`sleep`)."""

    def close(self) -> None:
        """Unload every served adapter from the server and delete the adapter folders (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for served in self._adapters.clear():
            try:
                self._request("POST", "/unload_lora_adapter", {"lora_name": served.lora_name}, wait=False)
            except (_HTTPError, ServerUnreachable):
                pass  # a server that is gone has nothing left to unload
        self._cleanup()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this vllm-server backend was closed: build a new agent to generate")


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # vLLM answers the LoRA routes with a plain-text line


def _load_error(base_url: str, folder: Path, err: _HTTPError) -> str:
    """One line naming the fix for a refused ``/v1/load_lora_adapter``."""
    message = _message(err.body)
    if err.status == 404 and "No adapter found" not in message:  # FastAPI's "Not Found": the route is missing
        return (f"the vLLM server at {base_url} has no /v1/load_lora_adapter route: start it with runtime LoRA "
                f"updating on (`{SERVE_HINT}`)")  # fmt: skip
    if err.status == 404:
        return (f"the vLLM server at {base_url} cannot read the adapter folder {folder} ({message}): set "
                "VLLMServerConfig.adapter_dir to a folder the server also sees")  # fmt: skip
    return f"the vLLM server at {base_url} refused the adapter saved in {folder} ({message}); it must run `{SERVE_HINT}`"


def _read_choices(answer: Any, expected: int, base_url: str) -> tuple[list[list[int]], list[list[float] | None]]:
    """Token ids and sampled-token log-probs of each choice, in choice order (prompt-major).

    Raises:
        RuntimeError: On a wrong number of choices, or a choice without token ids.
    """
    choices = sorted(answer.get("choices") or [], key=lambda c: int(c.get("index", 0))) if isinstance(answer, Mapping) else []
    if len(choices) != expected:
        raise RuntimeError(f"the vLLM server at {base_url} returned {len(choices)} completions, expected {expected}")
    rows, logps = [], []
    for choice in choices:
        logprobs = choice.get("logprobs") or {}
        ids = choice.get("token_ids")
        if ids is None:
            tokens = logprobs.get("tokens")
            if tokens is None or not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
                raise RuntimeError(f"the vLLM server at {base_url} returned completions without token ids: it must be "
                                   "a vLLM that accepts return_token_ids or return_tokens_as_token_ids (with logprobs)")  # fmt: skip
            ids = [int(t.split(":", 1)[1]) for t in tokens]
        rows.append([int(t) for t in ids])
        values = logprobs.get("token_logprobs")
        logps.append([float(v) for v in values] if values is not None and len(values) == len(ids) else None)
    return rows, logps


def _rollout_logprobs(
    unpadded: Sequence[Tensor], masks: Sequence[Tensor], row_logps: Sequence[list[float] | None], group_size: int
) -> list[Tensor]:
    """Per prompt ``[G, L_i + C_i - 1]`` float: each sampled token's log-prob at its mask position, else 0.

    A completion the server returned without log-probs gets NaN at its mask positions (the
    importance-sampling correction then skips the batch rather than weight it by made-up values).
    """
    result = []
    for p, (prompt, mask) in enumerate(zip(unpadded, masks, strict=True)):
        logp = torch.zeros(mask.shape, dtype=torch.float32)
        for g in range(group_size):
            values = row_logps[p * group_size + g]
            if values is None:
                logp[g][mask[g]] = math.nan
                continue
            for t in range(int(mask[g].sum())):
                logp[g, len(prompt) - 1 + t] = float(values[t])
        result.append(logp)
    return result


def build_vllm_server_backend(agent: Any, config: VLLMServerConfig | Mapping[str, Any] | None = None) -> VLLMServerBackend:
    """The ``"vllm-server"`` backend of an agent (:data:`~llm_gym.algorithms.rollout.backend.BACKENDS`).

    Args:
        agent: The GRPO agent.
        config: A :class:`VLLMServerConfig`, or a mapping of its fields (``{"base_url": ...}``).

    Returns:
        The backend.

    Raises:
        ValueError: Without ``base_url``.
        ServerUnreachable: If the server does not answer.
    """
    if config is None:
        config = VLLMServerConfig()
    elif isinstance(config, Mapping):
        fields = {f.name for f in dataclasses.fields(VLLMServerConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"unknown vllm-server setting(s) {unknown}; valid ones are {sorted(fields)}")
        config = VLLMServerConfig(**config)
    return VLLMServerBackend(agent, config)
