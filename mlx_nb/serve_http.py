"""The HTTP half of mlx_nb's server: one thread per connection, the OpenAI routes, server-sent events.

``HTTPServer(address, owner)`` serves for an ``owner`` (:class:`mlx_nb.serve.Server`) that
checks nothing itself: it has the model (``owner.model``), takes requests (``submit``),
yields their tokens (``events``) and is told when a handler is done with one (``finish``).
"""

from __future__ import annotations

import hmac
import json
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Protocol

from .openai_api import ApiError, Completion, ServedModel, StopText, chunk, completion, parse_json, reply, usage


@dataclass(frozen=True)
class Piece:
    """A token of a request's reply, as the handler gets it: its text, and its finish on the last."""

    text: str
    finish: Optional[str] = None  # "stop", "length"; None: more to come


class Ending(Enum):
    """How a handler was done with its request (the server counts each)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"  # its client left
    FAILED = "failed"


class Pending(Protocol):
    """A request handed to the ranks, as a handler sees it."""

    request: Completion
    gone: bool  # its client left


class Owner(Protocol):
    """What the HTTP side needs of the server it serves for (:class:`mlx_nb.serve.Server`)."""

    model: ServedModel
    api_key: Optional[str]
    max_body: int
    default_max_tokens: int
    serving: bool

    def arrive(self) -> float: ...

    def leave(self) -> None: ...

    def submit(self, request: Completion, arrived: float) -> Pending: ...

    def events(self, p: Pending, gone: Callable[[], bool]) -> Iterator[Piece]: ...

    def finish(self, p: Pending, ending: Ending) -> None: ...

    def note(self, line: str) -> None: ...


class HTTPServer(ThreadingHTTPServer):
    """One thread per connection; ``close_connections`` ends the open ones (idle keep-alives too)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 refused a burst of 16)

    def __init__(self, address: tuple[str, int], owner: Owner) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that ended badly (a reset: a browser tab closed, a script killed) is a line
        in the server's log: socketserver would print a traceback into the notebook's cell."""
        e = sys.exc_info()[1]
        self.owner.note(f"{_peer(client_address)}: connection ended ({type(e).__name__}: {e})")

    def close_connections(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while self.connections and time.monotonic() < deadline:
            time.sleep(0.05)  # handlers answering their last request
        with self.lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx_nb"
    timeout = 120  # an idle keep-alive connection is closed after this
    server: HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request on the notebook's stderr would bury its output

    def log_error(self, format: str, *args: Any) -> None:
        self.server.owner.note(f"{_peer(self.client_address)}: {format % args}")  # a timeout, a bad request line

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _handle(self, route: Callable[[], None]) -> None:
        self.streaming, self.body_read = False, self.command == "GET"
        try:
            self._authorize()
            route()
        except ApiError as e:
            self._error(e)
        except OSError:  # the client went away mid-answer
            self.close_connection = True
        except Exception as e:  # a bug of ours: say so, and serve the next request
            self._error(ApiError(500, f"Internal error: {type(e).__name__}: {e}", kind="server_error"))

    def _error(self, e: ApiError) -> None:
        if not self.body_read:
            self.close_connection = True  # the unread body would be read as the next request
        try:
            if self.streaming:
                self._event(e.body())
            else:
                self._json(e.status, e.body())
        except OSError:
            self.close_connection = True

    def _authorize(self) -> None:
        key = self.server.owner.api_key
        if key is not None and not hmac.compare_digest(
            self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()
        ):
            raise ApiError(
                401,
                "Incorrect or missing API key: send the key given to serve() / %mlx_serve --api-key "
                "as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )

    def _get(self) -> None:
        model = self.server.owner.model
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [model.card()]})
        elif path.startswith("/v1/models/"):
            model.check(path[len("/v1/models/") :])
            self._json(200, model.card())
        elif path == "/health":
            self._json(200, {"status": "ok" if self.server.owner.serving else "stopped"})
        else:
            self._unknown(("/v1/chat/completions", "/v1/completions"))

    def _post(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._unknown(("/v1/models", "/health"))
        owner = self.server.owner
        chat = path == "/v1/chat/completions"
        arrived = owner.arrive()  # from here to submit (which counts it gone) or leave, it is on its way to the ranks
        try:
            request = completion(parse_json(self._body()), owner.model, chat, owner.default_max_tokens)
        except BaseException:
            owner.leave()
            raise
        p = owner.submit(request, arrived)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        ending = Ending.FAILED
        try:
            ending = self._stream(p, rid) if request.stream else self._whole(p, rid)
        except OSError:  # a write to a client that left
            ending = Ending.CANCELLED
            raise
        finally:
            owner.finish(p, ending)

    def _unknown(self, other_method: tuple[str, ...]) -> None:
        path = self.path.split("?")[0].rstrip("/")
        status = 405 if path in other_method else 404
        raise ApiError(
            status,
            f"No route for {self.command} {self.path}: this server answers GET /v1/models, "
            "POST /v1/chat/completions and POST /v1/completions.",
        )

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "Send the request body with a Content-Length (chunked bodies are not supported).")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "A POST needs a Content-Length header.") from None
        limit = self.server.owner.max_body
        if length > limit:
            self._discard(length)
            raise ApiError(
                413,
                f"The request body is {length} bytes, over this server's limit of {limit} "
                "(serve(..., max_body=N) raises it).",
            )
        body = self.rfile.read(length)
        self.body_read = True
        return body

    def _discard(self, length: int) -> None:
        """Read a refused body (up to 64 MB, 10 s), so that the client reads the answer, not a reset."""
        left, deadline = min(length, 64 << 20), time.monotonic() + 10
        while left > 0 and time.monotonic() < deadline:
            got = self.rfile.read(min(left, 1 << 20))
            if not got:
                break
            left -= len(got)
        self.body_read = left == 0 and length <= 64 << 20

    def _gone(self) -> bool:
        """The client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _whole(self, p: Pending, rid: str) -> Ending:
        owner, request = self.server.owner, p.request
        stop, parts, finish, n = StopText(request.stop), [], None, 0
        for piece in owner.events(p, self._gone):
            n, finish = n + 1, piece.finish
            parts.append(stop.feed(piece.text))
            if stop.stopped:
                finish = "stop"
                break
        if p.gone:
            return Ending.CANCELLED
        parts.append(stop.flush())
        body = reply(request.chat, rid, owner.model.id, "".join(parts), finish, usage(len(request.prompt), n, p.cached))
        self._json(200, body)
        return Ending.COMPLETED

    def _stream(self, p: Pending, rid: str) -> Ending:
        owner, request = self.server.owner, p.request
        model, chat = owner.model.id, request.chat
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.streaming, self.close_connection = True, True
        if chat:
            self._event(chunk(chat, rid, model, ""))
        stop, n = StopText(request.stop), 0
        for piece in owner.events(p, self._gone):
            n += 1
            out = stop.feed(piece.text)
            finish = "stop" if stop.stopped else piece.finish
            out += stop.flush() if finish is not None else ""
            if out:
                self._event(chunk(chat, rid, model, out))
            if finish is not None:
                self._event(chunk(chat, rid, model, None, finish))
                break
        if p.gone:
            return Ending.CANCELLED
        if request.include_usage:
            self._event(chunk(chat, rid, model, usage=usage(len(request.prompt), n, p.cached)))
        self.wfile.write(b"data: [DONE]\n\n")
        return Ending.COMPLETED

    def _event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")

    def _json(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _peer(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else str(address)
