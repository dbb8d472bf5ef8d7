"""A local HTTP server speaking the OpenAI chat-completions API over one loaded Model.

Built on the standard library's ThreadingHTTPServer (no HTTP parsing here, no extra dependency):

    POST /v1/chat/completions   non-streaming, or server-sent events with "stream": true
    GET  /v1/models             the one model served
    GET  /health                "ok"

Requests are served one generation at a time (the model's lock, state.py), in arrival order as the lock
grants it; at most `queue_limit` requests wait or run at once, a number bounded by the memory plan's headroom
when there is a budget, and any request beyond it gets HTTP 503 with the reason. Every bad request (malformed
JSON, an unknown field, an oversized body, a prompt too long for the context) gets a 4xx with a one-line reason
and the server keeps serving. Extension fields: top_k, min_p, repetition_penalty, and session_id: the server
then keeps the conversation and `messages` holds only the new turn (else `messages` is the whole conversation,
and the shared prefix with the previous request is reused from the KV cache anyway).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import ContextOverflowError, EdgeError
from .generation.stats import MB

DEFAULT_HOST = "127.0.0.1"
MAX_BODY = 1 << 20              # bytes of one request body
DEFAULT_QUEUE = 16              # requests waiting or running at once, when no budget says otherwise
REQUEST_BYTES = 16 * MAX_BODY   # what one waiting request may hold: its body parsed into Python objects
MAX_SESSIONS = 64
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
          "stream_options", "stop", "seed", "n", "user", "top_k", "min_p", "repetition_penalty", "session_id"}
ROLES = ("system", "user", "assistant")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class RequestError(EdgeError):
    """A request the server refuses: HTTP `status`, one-line message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def queue_limit(model, budget: int | None, requested: int = DEFAULT_QUEUE) -> int:
    """Requests allowed in flight: `requested`, fewer when the memory budget's headroom over the model's plan
    cannot hold that many request bodies (at least one: the plan itself already fits)."""
    if budget is None:
        return requested
    from .memory import budget as planner

    b = model.backend
    plan = planner.plan_session(model.bundle, model.context, backend=b.name, kv_dtype=getattr(b, "kv_dtype", None),
                                prefill_chunk=model.prefill_chunk, threads=getattr(b, "threads", 1))
    return max(1, min(requested, (budget - plan.total) // REQUEST_BYTES))


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts")


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}] must be an object with role {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


def _number(body: dict, key: str, default, kind=(int, float)):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind):
        raise RequestError(400, f"{key} must be a number, got {v!r:.40}")
    return v


def parse_request(body) -> dict:
    """Generation options from a chat-completions body (checked; unknown fields refused)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field(s): {', '.join(unknown)}")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                                           and all(isinstance(s, str) and s for s in stop))):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings")
    session_id = body.get("session_id")
    if session_id is not None and not (isinstance(session_id, str) and 0 < len(session_id) <= 128):
        raise RequestError(400, "session_id must be a string of 1 to 128 characters")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r:.40}")
    options = {"temperature": float(_number(body, "temperature", 1.0)), "top_p": float(_number(body, "top_p", 1.0)),
               "top_k": _number(body, "top_k", 0, int), "min_p": float(_number(body, "min_p", 0.0)),
               "repetition_penalty": float(_number(body, "repetition_penalty", 1.0)),
               "seed": _number(body, "seed", None, int), "stop": stop or ()}
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False)) \
        if isinstance(body.get("stream_options"), (dict, type(None))) else None
    if include_usage is None:
        raise RequestError(400, "stream_options must be an object")
    return {"messages": parse_messages(body.get("messages")), "stream": body.get("stream") is True,
            "max_tokens": max_tokens, "session_id": session_id, "include_usage": include_usage,
            "options": options}


class ChatService:
    """The model behind the server: sessions by id, the in-flight bound, and one completion per request."""

    def __init__(self, model, name: str, limit: int = DEFAULT_QUEUE, max_tokens: int = 512):
        self.model, self.name, self.max_tokens = model, name, max_tokens
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._sessions: OrderedDict[str, object] = OrderedDict()
        self._busy: set[str] = set()  # session ids with a request in flight
        self._sessions_lock = threading.Lock()

    def admit(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise RequestError(503, f"server busy: {self.limit} requests already waiting or running (the bound "
                                    f"set by the memory plan); retry later", "server_busy")

    def done(self) -> None:
        self._slots.release()

    def _session(self, session_id: str):
        """The conversation `session_id`, marked busy until finish(): a conversation takes one turn at a time."""
        with self._sessions_lock:
            if session_id in self._busy:
                raise RequestError(409, f"session {session_id!r:.40} is answering another request", "session_busy")
            self._busy.add(session_id)
            session = self._sessions.pop(session_id, None) or self.model.session()
            self._sessions[session_id] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return session

    def finish(self, req: dict) -> None:
        if req.pop("holds_session", False):
            with self._sessions_lock:
                self._busy.discard(req["session_id"])

    def start(self, req: dict):
        """The ResponseStream answering `req` (its prompt checked against the context first)."""
        messages = req["messages"]
        max_tokens = req["max_tokens"]
        try:
            if req["session_id"] is not None:
                session = self._session(req["session_id"])
                req["holds_session"] = True
                if max_tokens is None:
                    max_tokens = self.max_tokens
                return session.stream(messages, max_tokens, **req["options"])
            n_prompt = len(self.model.encode_prompt(messages))
            if max_tokens is None:
                max_tokens = max(1, min(self.max_tokens, self.model.context - n_prompt + 1))
            return self.model.stream(messages, max_tokens, **req["options"])
        except ContextOverflowError as e:
            raise RequestError(400, str(e), "context_length_exceeded") from None
        except RequestError:
            raise
        except EdgeError as e:
            raise RequestError(400, str(e)) from None


def _chunk(cid: str, name: str, created: int, delta: dict, finish: str | None, usage=None) -> bytes:
    data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        data = {**data, "choices": [], "usage": usage}
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _usage(stream) -> dict:
    s = stream.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens}


def sse_events(stream, name: str, include_usage: bool) -> Iterator[bytes]:
    """The server-sent events of one streamed completion, ending with `data: [DONE]`."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    yield _chunk(cid, name, created, {"role": "assistant", "content": ""}, None)
    for r in stream:
        if r.text:
            yield _chunk(cid, name, created, {"content": r.text}, None)
        if r.finish_reason is not None:
            yield _chunk(cid, name, created, {}, FINISH[r.finish_reason])
    if include_usage:
        yield _chunk(cid, name, created, {}, None, _usage(stream))
    yield b"data: [DONE]\n\n"


def completion(stream, name: str) -> dict:
    g = stream.collect()
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                                        "finish_reason": FINISH[g.finish_reason]}],
            "usage": _usage(stream)}


class Handler(BaseHTTPRequestHandler):
    """One request: routes, body limits, JSON in and out; the service does the rest."""

    service: ChatService
    max_body = MAX_BODY
    server_version = "edge-run"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the CLI prints one line per server start, not per request

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.service.name, "object": "model",
                                                          "owned_by": "edge-runtime"}]})
        else:
            self._error(RequestError(404, f"no route {self.path}", "not_found"))

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._error(RequestError(404, f"no route {self.path}", "not_found"))
            return
        try:
            req = parse_request(self._body())
            self.service.admit()
        except RequestError as e:
            self._error(e)
            return
        try:
            self._answer(req)
        finally:
            self.service.finish(req)
            self.service.done()

    def _answer(self, req: dict) -> None:
        try:
            stream = self.service.start(req)
        except RequestError as e:
            self._error(e)
            return
        try:
            if not req["stream"]:
                self._json(200, completion(stream, self.service.name))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for event in sse_events(stream, self.service.name, req["include_usage"]):
                self.wfile.write(event)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left: closing the stream below frees the model for the next request
        finally:
            stream.close()

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "a Content-Length header is required")
        if int(length) > self.max_body:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(413, f"request body of {int(length)} bytes exceeds the limit of "
                                    f"{self.max_body / MB:.1f} MB")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"malformed JSON: {str(e).splitlines()[0]}") from None

    def _json(self, status: int, data: dict) -> None:
        payload = json.dumps(data, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, e: RequestError) -> None:
        self._json(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}})


def make_server(model, host: str = DEFAULT_HOST, port: int = 8000, name: str | None = None,
                limit: int = DEFAULT_QUEUE, max_tokens: int = 512, max_body: int = MAX_BODY) -> ThreadingHTTPServer:
    """A ready server (call serve_forever(); port 0 picks a free one: server.server_address)."""
    service = ChatService(model, name or model.bundle.root.name, limit, max_tokens)
    handler = type("EdgeHandler", (Handler,), {"service": service, "max_body": max_body})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.service = service
    return server
