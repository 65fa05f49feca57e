"""A minimal OpenAI-compatible ``/v1/chat/completions`` server on the standard library, for tests and tutorials.

It serves a local causal LM (:func:`model_responder`) or any scripted responder, so the endpoint
evaluation can be exercised end to end over real HTTP without the network or a vLLM install::

    with ChatServer(model_responder(tiny_model_path("tiny")), model="tiny") as server:
        ...  # llm-gym eval --base-url {server.base_url} --model tiny

It is not a production server: one model, requests answered one at a time by the model, and a
streamed answer (``stream: true``) is sent word by word after it is complete. Use vLLM or SGLang
for real work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_gym.http_stub import JSONHandler, ThreadedServer

__all__ = ["ChatServer", "Reply", "completion_body", "model_responder"]

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """What the server does with one request.

    Attributes:
        status: HTTP status.
        body: JSON body.
        headers: Extra headers (e.g. ``Retry-After``).
        delay: Seconds to wait before answering (past the client's timeout: a timeout).
        drop: Close the connection without an answer (a dropped connection).
        drop_after: For a streamed answer, close the connection after this many chunks (a stream cut
            short).
    """

    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    drop_after: int | None = None


Responder = Callable[[Mapping[str, Any]], Reply]


def completion_body(model: str, text: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> dict[str, Any]:
    """A ``chat.completion`` JSON body holding one assistant message."""
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }  # fmt: skip


def model_responder(model_path: str, name: str | None = None, seed: int = 0) -> Responder:
    """A responder that answers with a local causal LM (its chat template applied).

    Honours ``max_tokens`` (default 64), ``temperature`` (0: greedy) and vLLM's
    ``continue_final_message`` (continue a final assistant prefill).

    Args:
        model_path: A folder ``transformers`` loads (e.g. :func:`llm_gym.tiny.tiny_model_path`).
        name: Model name the server answers to (checked by :class:`ChatServer`); default ``model_path``.
        seed: Seed of the sampling (each request reseeds with ``seed`` + its count).

    Returns:
        ``respond(body) -> Reply``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    lock = threading.Lock()  # one generation at a time: the model is not thread-safe
    served = name or model_path
    count = [0]

    def respond(body: Mapping[str, Any]) -> Reply:
        messages = body["messages"]
        cont = bool(body.get("continue_final_message")) and messages[-1]["role"] == "assistant"
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=not cont,
                                            continue_final_message=cont, return_dict=False)  # fmt: skip
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        with lock, torch.inference_mode():
            count[0] += 1
            torch.manual_seed(seed + count[0])
            prompt = torch.tensor([list(ids)], dtype=torch.long)  # [1, L]
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=int(body.get("max_tokens") or 64),
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=None,
                top_p=None, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )  # fmt: skip
        new = out[0, prompt.shape[1] :].tolist()
        if new and new[-1] == tokenizer.eos_token_id:
            new = new[:-1]
        text = str(tokenizer.decode(new, skip_special_tokens=True))
        return Reply(body=completion_body(served, text, prompt.shape[1], len(new)))

    return respond


class ChatServer(ThreadedServer):
    """An HTTP server on ``host:port`` (port 0: a free one) answering ``/v1/chat/completions``.

    A request for a model other than ``model`` gets a 404 like vLLM's; ``GET /v1/models`` lists
    ``model``. The server runs in a daemon thread from :meth:`start` (or ``with``) to :meth:`close`.

    Args:
        respond: ``respond(body) -> Reply`` for each chat request.
        model: The served model name.
        host: Interface to bind.
        port: Port (0 picks a free one).

    Attributes:
        requests: Chat requests received (retries and rejected ones included).
    """

    thread_name = "chat-server"

    def __init__(self, respond: Responder, model: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.respond = respond
        self.model = model
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(JSONHandler):
            log_name = "chat server"

            def _send(self, reply: Reply) -> None:
                self.send_json(reply.status, reply.body, reply.headers)

            def do_GET(self) -> None:  # noqa: N802 - the http.server hook
                if self.path.rstrip("/").endswith("/models"):
                    self._send(Reply(body={"object": "list", "data": [{"id": server.model, "object": "model"}]}))
                else:
                    self._send(Reply(status=404, body={"error": {"message": f"no route {self.path}"}}))

            def do_POST(self) -> None:  # noqa: N802 - the http.server hook
                body = self.read_json()
                with server._lock:
                    server.requests += 1
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    reply = Reply(status=404, body={"error": {"message": f"no route {self.path}"}})
                elif body.get("model") != server.model:
                    reply = Reply(status=404, body={"error": {
                        "message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError",
                        "code": 404}})  # fmt: skip
                else:
                    reply = server.respond(body)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    return
                try:
                    if body.get("stream") and reply.status == 200:
                        self._stream(reply, bool((body.get("stream_options") or {}).get("include_usage")))
                    else:
                        self._send(reply)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def _stream(self, reply: Reply, include_usage: bool) -> None:
                """Server-sent events: one ``chat.completion.chunk`` per word of the answer, then ``[DONE]``."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # no Content-Length: the stream ends when the connection closes (HTTP/1.0)
                text = reply.body["choices"][0]["message"]["content"]
                pieces = [p for p in text.replace(" ", " \0").split("\0") if p]
                base = {"id": reply.body["id"], "object": "chat.completion.chunk", "created": reply.body["created"],
                        "model": reply.body["model"]}  # fmt: skip
                for k, piece in enumerate(pieces):
                    if reply.drop_after is not None and k >= reply.drop_after:
                        self.close_connection = True
                        return
                    chunk = {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                end = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                self.wfile.write(f"data: {json.dumps(end)}\n\n".encode())
                if include_usage:
                    usage = {**base, "choices": [], "usage": reply.body["usage"]}
                    self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self._server = self._bind_server(host, port, Handler)
