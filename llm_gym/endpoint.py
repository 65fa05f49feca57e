"""Chat completions from any OpenAI-compatible endpoint (vLLM, SGLang, a hosted API), robustly.

The official ``openai`` async client sends the requests, at most ``concurrency`` at a time, each
with a time limit. A request that hits a 429, a 5xx, a timeout or a dropped connection is retried
with exponential backoff (a 429's ``Retry-After`` is honoured), at most ``max_retries`` times; if it
still fails it comes back as failed (:attr:`Answer.error`), to be counted and shown, never scored as
a wrong answer. Errors that no retry can fix (the server's 404 for an unknown model, a rejected API
key) stop the whole run with :class:`EndpointFatal`, whose message names the fix. The client's own
retries are off so that every attempt is counted here. With ``stream`` the answer arrives chunk by
chunk (``on_tokens`` sees each one); a stream that ends without its final chunk is retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Answer", "EndpointClient", "EndpointConfig", "EndpointFatal", "Request", "StreamCut", "complete_all", "gather_or_cancel"]

logger = logging.getLogger(__name__)


class StreamCut(ConnectionError):
    """A streamed answer ended before its final chunk (retried like a dropped connection)."""


class EndpointFatal(RuntimeError):
    """An error no retry fixes (unknown model, bad key, unreachable server); the message names the fix."""


@dataclass(frozen=True)
class EndpointConfig:
    """Where to send requests and how.

    Attributes:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: The served model name.
        api_key: The key (read from an environment variable by the CLI; never logged).
        concurrency: Requests in flight at once.
        timeout: Seconds one attempt may take.
        max_retries: Retries of a request after its first attempt.
        backoff: Seconds before the first retry; doubled for each further one.
        max_backoff: Longest wait between attempts (a larger ``Retry-After`` is cut to it).
        temperature: Sampling temperature.
        max_tokens: Completion budget per request; ``None``: the server's default.
        continue_prefill: When the conversation ends with an assistant prefill, ask the server to
            continue it (``continue_final_message``, as vLLM and SGLang accept) instead of
            starting a new assistant turn.
        stream: Stream each answer (``stream=True``), so progress counts tokens as they arrive; a
            stream cut short is retried like a dropped connection.
    """

    base_url: str
    model: str
    api_key: str = field(default="EMPTY", repr=False)  # never in a log line
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    temperature: float = 1.0
    max_tokens: int | None = None
    continue_prefill: bool = True
    stream: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"--concurrency={self.concurrency} must be at least 1")
        if not self.timeout > 0:
            raise ValueError(f"--timeout={self.timeout} must be positive seconds")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries={self.max_retries} must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max-tokens={self.max_tokens} must be at least 1")

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling parameters that change an answer (part of the cache key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "continue_prefill": self.continue_prefill}


@dataclass(frozen=True)
class Request:
    """One chat completion to ask for: ``key`` identifies it to the caller."""

    key: Any
    messages: Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Answer:
    """The outcome of one :class:`Request`.

    Attributes:
        key: The request's key.
        text: The completion's text; ``None`` when failed.
        completion_tokens: Tokens of the completion as the server counted them (``usage``), if given.
        error: Why it failed after its retries, else ``None``.
        attempts: Attempts made.
        seconds: Wall time, retries included.
    """

    key: Any
    text: str | None
    completion_tokens: int | None = None
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0


def _retry_after(err: Any) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: fall back to the backoff
        return None


class EndpointClient:
    """The async client: bounded concurrency, the retry loop, and fatal errors raised as :class:`EndpointFatal`.

    The first request goes alone and every other one waits for it: if the server cannot be reached
    at all (connection refused, no such host), or answers 404 / 401, nothing else is sent.

    Args:
        config: The endpoint and its limits.
    """

    def __init__(self, config: EndpointConfig) -> None:
        import openai

        self.openai = openai
        self.config = config
        self.client = openai.AsyncOpenAI(
            base_url=config.base_url, api_key=config.api_key, timeout=config.timeout, max_retries=0
        )
        self.fatal = (openai.NotFoundError, openai.AuthenticationError, openai.PermissionDeniedError)
        import httpx

        # httpx's transport errors: a stream cut short surfaces from the iteration, not wrapped by openai
        self.retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                          httpx.TransportError, StreamCut)  # fmt: skip
        self.on_tokens: Callable[[Any, int], None] | None = None
        """Called as ``on_tokens(key, n)`` when a stream delivers ``n`` more chunks (about one token each)."""
        self._gate: asyncio.Semaphore | None = None
        self._first: asyncio.Event | None = None
        self._started = False

    def _fatal_message(self, err: Any) -> str:
        c = self.config
        if isinstance(err, self.openai.NotFoundError):
            return (f"{c.base_url} answered 404 for model {c.model!r} ({_short(err)}): pass the --model name the "
                    "server serves (GET /v1/models lists them) and check --base-url ends in /v1")  # fmt: skip
        return f"{c.base_url} refused the API key ({_short(err)}): set the right key in the --api-key-env variable"

    async def ask(self, request: Request) -> Answer:
        """One chat completion, retried as the module docstring says.

        Raises:
            EndpointFatal: the model is unknown, the key refused, or the first request found no server.
        """
        if self._gate is None:  # created inside the running loop
            self._gate, self._first = asyncio.Semaphore(self.config.concurrency), asyncio.Event()
        assert self._first is not None
        if not self._started:
            self._started = True
            try:
                answer = await self._ask(request)
                if answer.error is not None and answer.error.startswith("APIConnectionError (ConnectError)"):
                    raise EndpointFatal(f"cannot reach {self.config.base_url} (connection refused or no such host, "
                                        f"{answer.attempts} attempts): check --base-url and that the server is "
                                        "running")  # fmt: skip
                return answer
            finally:
                self._first.set()
        await self._first.wait()
        async with self._gate:
            return await self._ask(request)

    async def _ask(self, request: Request) -> Answer:
        c = self.config
        extra: dict[str, Any] = {}
        if c.continue_prefill and request.messages and request.messages[-1]["role"] == "assistant":
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        kwargs: dict[str, Any] = {"model": c.model, "messages": [dict(m) for m in request.messages],
                                  "temperature": c.temperature}  # fmt: skip
        if c.max_tokens is not None:
            kwargs["max_tokens"] = c.max_tokens
        if extra:
            kwargs["extra_body"] = extra
        start = time.perf_counter()
        error = ""
        for attempt in range(c.max_retries + 1):
            try:
                if c.stream:
                    text, tokens = await self._streamed(kwargs, request.key)
                    return Answer(request.key, text, tokens, attempts=attempt + 1, seconds=time.perf_counter() - start)
                reply = await self.client.chat.completions.create(**kwargs)
            except self.fatal as err:
                raise EndpointFatal(self._fatal_message(err)) from None
            except self.retryable as err:
                cause = type(err.__cause__).__name__ if err.__cause__ is not None else ""
                error = f"{type(err).__name__}{f' ({cause})' if cause else ''}: {_short(err)}"
                if attempt == c.max_retries:
                    break
                wait = min(c.max_backoff, _retry_after(err) or c.backoff * 2**attempt)
                logger.info("request %s: %s; retry %d/%d in %.1fs", request.key, error, attempt + 1, c.max_retries, wait)
                await asyncio.sleep(wait)
                continue
            except self.openai.APIStatusError as err:  # 400, 422...: this request is bad, no retry helps
                error = f"{type(err).__name__}: {_short(err)}"
                return Answer(request.key, None, error=error, attempts=attempt + 1,
                              seconds=time.perf_counter() - start)  # fmt: skip
            text = reply.choices[0].message.content if reply.choices else None
            tokens = reply.usage.completion_tokens if reply.usage is not None else None
            return Answer(request.key, text or "", tokens, attempts=attempt + 1, seconds=time.perf_counter() - start)
        return Answer(request.key, None, error=error, attempts=c.max_retries + 1, seconds=time.perf_counter() - start)

    async def _streamed(self, kwargs: dict[str, Any], key: Any) -> tuple[str, int | None]:
        """One streamed completion: its text and the server's token count (else the chunk count)."""
        stream = await self.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        pieces: list[str] = []
        usage: int | None = None
        finished = False
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                pieces.append(delta)
                if self.on_tokens is not None:
                    self.on_tokens(key, 1)
        if not finished:  # the connection closed before the final chunk: a partial answer is no answer
            raise StreamCut(f"the stream ended after {len(pieces)} chunks without a finish_reason")
        return "".join(pieces), usage if usage is not None else len(pieces)

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self.client.close()


def _short(err: Any) -> str:
    return str(getattr(err, "message", None) or err).splitlines()[0][:200]


async def complete_all(
    requests: Sequence[Request],
    config: EndpointConfig,
    on_answer: Callable[[Answer], None | Awaitable[None]] | None = None,
) -> list[Answer]:
    """Ask every request, ``config.concurrency`` at a time; ``on_answer`` sees each answer as it arrives.

    The first request goes alone: if the server cannot be reached at all, or answers 404 / 401,
    nothing else is sent and :class:`EndpointFatal` is raised.

    Args:
        requests: What to ask.
        config: The endpoint and its limits.
        on_answer: Called with every answer (failed ones included) in completion order, e.g. to
            append it to the rollout log at once.

    Returns:
        The answers, in request order.

    Raises:
        EndpointFatal: the model is unknown, the key refused, or the first request found no server.
    """
    client = EndpointClient(config)
    answers: dict[int, Answer] = {}

    async def one(i: int) -> None:
        answers[i] = answer = await client.ask(requests[i])
        if on_answer is not None:
            out = on_answer(answer)
            if asyncio.iscoroutine(out):
                await out

    try:
        await gather_or_cancel([one(i) for i in range(len(requests))])
    finally:
        await client.close()
    return [answers[i] for i in range(len(requests))]


async def gather_or_cancel(coroutines: Sequence[Awaitable[Any]]) -> list[Any]:
    """``asyncio.gather`` that cancels (and awaits) the other tasks when one raises."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
