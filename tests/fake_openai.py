"""A real HTTP server that speaks enough of the OpenAI API for ldpipe's LLM tests.

Loopback only (127.0.0.1, a free port), stdlib `ThreadingHTTPServer`. It implements
  POST /v1/chat/completions, POST /v1/files, POST /v1/batches, GET /v1/batches/{id}, GET /v1/files/{id}/content
with deterministic replies derived from the prompt, and a fault script that injects, per request number or per
prompt substring: 429 (+ Retry-After), 500, 503, 400, 401 (echoing the key, as a careless server might), a delay,
a dropped connection, a malformed JSON body, `{"choices": []}`, a huge completion that ignores max_tokens
(`Fault("huge", chars=N)`) and silence (`Fault("silent")`: the request is read and never answered). It counts
requests and records the largest number of chat requests in flight at once.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import re
import secrets
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "503", "400", "401", "delay", "reset", "bad_json", "empty_choices", "huge", "silent")


@dataclass(frozen=True)
class Fault:
    kind: str                        # one of FAULT_KINDS
    retry_after: str | None = None   # the Retry-After header sent with a 429
    seconds: float = 0.0             # how long a "delay" fault stalls before answering
    chars: int = 0                   # the length of a "huge" fault's completion

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {FAULT_KINDS}")


def reply_for(user: str) -> str:
    """The deterministic 'model': rephrases reverse the words (format-keeping ones also upper-case them),
    random-sentence requests get n numbered words, anything else is echoed reversed."""
    m = re.search(r"Reference sentence: (.*)\n\nOutput: $", user, re.S)
    if m:
        words = m.group(1).split(" ")[::-1]
        return " ".join(w.upper() for w in words) if "change the meaning" in user else " ".join(words)
    m = re.fullmatch(r"Please generate a random sentence with (\d+) words\.", user)
    if m:
        return " ".join(f"word{i}" for i in range(int(m.group(1))))
    return " ".join(user.split(" ")[::-1])


def completion_body(req: dict, text: str, n: int) -> dict[str, Any]:
    """A chat completion for `req`; one word stands for one token, so max_tokens cuts the text (finish "length")."""
    words, finish = text.split(" "), "stop"
    if req.get("max_tokens") and len(words) > req["max_tokens"]:
        words, finish = words[: req["max_tokens"]], "length"
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1700000000, "model": req["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}}


class FakeOpenAI:
    """Start with `start()` (or `with FakeOpenAI() as srv`), point a client at `srv.base_url`, stop with `stop()`."""

    def __init__(self, *, latency_s: float = 0.0, batch_polls: int = 2):
        self.latency_s = latency_s          # every chat request takes at least this long (to make overlap visible)
        self.batch_polls = batch_polls      # a batch reports completed on this many-th retrieve
        # decorate(user_prompt, reply) -> the text actually sent, e.g. with a chatty preamble
        self.decorate: Callable[[str, str], str] | None = None
        self.batch_fail_substring: str | None = None   # batch lines whose prompt holds it come back as errors
        self.id_tag = secrets.token_hex(3)
        self.lock = threading.Lock()
        self.n_requests = 0          # every HTTP request, any endpoint
        self.n_chat = 0              # POST /v1/chat/completions
        self.n_batch_lines = 0       # lines processed inside batches
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_headers: set[str] = set()
        self.chat_bodies: list[dict] = []
        self.files: dict[str, tuple[str, bytes]] = {}       # id -> (purpose, content)
        self.batches: dict[str, dict] = {}
        self._by_request: dict[int, Fault] = {}
        self._by_prompt: dict[str, deque[Fault]] = defaultdict(deque)
        self._always: dict[str, Fault] = {}
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ fault script
    def fail_request(self, n: int, fault: Fault) -> None:
        """Inject `fault` into the n-th chat request (1-based, counted over the server's life)."""
        self._by_request[n] = fault

    def fail_prompt(self, substring: str, *faults: Fault, forever: Fault | None = None) -> None:
        """The next requests whose user prompt holds `substring` get `faults` in order; then `forever`, if given."""
        self._by_prompt[substring].extend(faults)
        if forever is not None:
            self._always[substring] = forever

    def clear_faults(self) -> None:
        self._by_request.clear()
        self._by_prompt.clear()
        self._always.clear()

    def _fault_for(self, n: int, user: str) -> Fault | None:
        if n in self._by_request:
            return self._by_request.pop(n)
        for sub, queue in self._by_prompt.items():
            if sub in user and queue:
                return queue.popleft()
        for sub, fault in self._always.items():
            if sub in user:
                return fault
        return None

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()    # wakes handlers stalled in a "delay" fault
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ batch processing
    def _run_batch(self, batch: dict) -> None:
        _, content = self.files[batch["input_file_id"]]
        out, err = [], []
        for i, line in enumerate(content.decode().splitlines()):
            if not line.strip():
                continue
            req = json.loads(line)
            body = req["body"]
            user = body["messages"][-1]["content"]
            with self.lock:
                self.n_batch_lines += 1
            if self.batch_fail_substring and self.batch_fail_substring in user:
                err.append({"id": f"batch_req_{i}", "custom_id": req["custom_id"],
                            "response": {"status_code": 500, "request_id": f"r{i}",
                                         "body": {"error": {"message": "injected batch failure"}}},
                            "error": None})
                continue
            text = reply_for(user)
            if self.decorate:
                text = self.decorate(user, text)
            out.append({"id": f"batch_req_{i}", "custom_id": req["custom_id"],
                        "response": {"status_code": 200, "request_id": f"r{i}",
                                     "body": completion_body(body, text, i)},
                        "error": None})
        for kind, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = f"file-{len(self.files) + 1}"
                self.files[fid] = ("batch_output", "".join(json.dumps(r) + "\n" for r in rows).encode())
                batch[kind] = fid
        batch["status"] = "completed"
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send_json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(code, json.dumps(obj).encode(), "application/json", headers)

    def _send_raw(self, code: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout fired)
            self.close_connection = True

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(code, {"error": {"message": message, "type": "fake", "code": code}}, headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _count(self) -> None:
        with self.fake.lock:
            self.fake.n_requests += 1
            self.fake.auth_headers.add(self.headers.get("Authorization", ""))

    def do_POST(self) -> None:
        self._count()
        body = self._body()
        if self.path == "/v1/chat/completions":
            self._chat(json.loads(body))
        elif self.path == "/v1/files":
            self._upload(body)
        elif self.path == "/v1/batches":
            req = json.loads(body)
            if req.get("input_file_id") not in self.fake.files:
                return self._error(400, f"no such file {req.get('input_file_id')!r}")
            bid = f"batch_{self.fake.id_tag}_{len(self.fake.batches) + 1}"   # unique across servers, like OpenAI's
            batch = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": req["input_file_id"],
                     "completion_window": req["completion_window"], "status": "validating",
                     "created_at": int(time.time()), "polls": 0}
            self.fake.batches[bid] = batch
            self._send_json(200, _public(batch))
        else:
            self._error(404, f"no route POST {self.path}")

    def do_GET(self) -> None:
        self._count()
        m = re.fullmatch(r"/v1/batches/([\w-]+)", self.path)
        if m and m.group(1) in self.fake.batches:
            batch = self.fake.batches[m.group(1)]
            batch["polls"] += 1
            if batch["status"] != "completed":
                if batch["polls"] >= self.fake.batch_polls:
                    self.fake._run_batch(batch)
                else:
                    batch["status"] = "in_progress"
            return self._send_json(200, _public(batch))
        m = re.fullmatch(r"/v1/files/([\w-]+)/content", self.path)
        if m and m.group(1) in self.fake.files:
            return self._send_raw(200, self.fake.files[m.group(1)][1], "application/octet-stream")
        self._error(404, f"no route GET {self.path}")

    def _upload(self, body: bytes) -> None:
        # multipart/form-data, parsed with the stdlib email parser (the cgi module is deprecated)
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                  for part in msg.iter_parts()}
        if "file" not in fields or "purpose" not in fields:
            return self._error(400, f"multipart upload lacks file/purpose: {sorted(fields)}")
        fid = f"file-{len(self.fake.files) + 1}"
        purpose = fields["purpose"].decode()
        self.fake.files[fid] = (purpose, fields["file"])
        self._send_json(200, {"id": fid, "object": "file", "bytes": len(fields["file"]), "created_at": 1700000000,
                              "filename": "upload.jsonl", "purpose": purpose, "status": "processed"})

    def _chat(self, req: dict) -> None:
        fake = self.fake
        user = req["messages"][-1]["content"]
        with fake.lock:
            fake.n_chat += 1
            n = fake.n_chat
            fake.chat_bodies.append(req)
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            fault = fake._fault_for(n, user)
        try:
            if fake.latency_s:
                fake._stopping.wait(fake.latency_s)
            self._chat_reply(req, user, n, fault)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _chat_reply(self, req: dict, user: str, n: int, fault: Fault | None) -> None:
        kind = fault.kind if fault else None
        if kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return self._error(429, "rate limited (injected)", headers)
        if kind in ("500", "503", "400"):
            return self._error(int(kind), f"injected {kind}")
        if kind == "401":
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._error(401, f"Incorrect API key provided: {key}")
        if kind == "reset":  # drop the connection without a response
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "bad_json":
            return self._send_raw(200, b'{"id": "x", "choices": [', "application/json")
        if kind == "empty_choices":
            return self._send_json(200, {"id": "x", "object": "chat.completion", "model": req["model"],
                                         "created": 0, "choices": []})
        if kind == "silent":   # never answers; the handler ends when the server stops or the client hangs up
            self.fake._stopping.wait()
            self.close_connection = True
            return
        if kind == "huge":     # one "word" of fault.chars characters, so max_tokens does not cut it
            return self._send_json(200, completion_body({"model": req["model"]}, "x" * fault.chars, n))
        if kind == "delay":
            self.fake._stopping.wait(fault.seconds)
        text = reply_for(user)
        if self.fake.decorate:
            text = self.fake.decorate(user, text)
        self._send_json(200, completion_body(req, text, n))


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "polls"}
