"""What the standard-library test servers share: a JSON request handler and a server run in a daemon thread.

The stand-in servers (:class:`~llm_gym.chat_server.ChatServer`, :class:`~llm_gym.lora_server.LoRAServer`)
differ in their routes only; reading a JSON body, answering one, quiet logging, binding, serving in
a thread, ``base_url`` and shutting down live here once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

__all__ = ["JSONHandler", "ThreadedServer"]

logger = logging.getLogger(__name__)

_S = TypeVar("_S", bound="ThreadedServer")


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that reads and writes JSON and logs through :mod:`logging` (debug), not stderr.

    Attributes:
        log_name: Prefix of its log lines (set by a subclass).
    """

    log_name = "http server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Route http.server's access log to ``logging`` at debug level."""
        logger.debug(f"{self.log_name}: {format}", *args)

    def read_json(self) -> Any:
        """The request's JSON body (``{}`` when empty)."""
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def send_json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        """Answer ``status`` with ``body``: JSON, or plain text when ``body`` is a string.

        Args:
            status: HTTP status.
            body: A JSON-serialisable value, or the text of a plain-text answer.
            headers: Extra headers (e.g. ``Retry-After``).
        """
        text = isinstance(body, str)
        data = (body if text else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class ThreadedServer:
    """A :class:`ThreadingHTTPServer` served from a daemon thread, from :meth:`start` (or ``with``) to :meth:`close`.

    A subclass binds with :meth:`_bind_server` (into ``self._server``) and names its thread.
    """

    thread_name = "http-server"
    _server: ThreadingHTTPServer
    _thread: threading.Thread | None = None

    @staticmethod
    def _bind_server(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        """Bind ``host:port`` (port 0: a free one); each request is answered in a daemon thread."""
        httpd = ThreadingHTTPServer((host, port), handler)
        httpd.daemon_threads = True
        return httpd

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self: _S) -> _S:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name=self.thread_name)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
