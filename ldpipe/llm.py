"""Chat completions from any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama) through the official
`openai` client, with a persistent SQLite cache, a concurrency limit, bounded retries and an optional Batch API path.

One file on purpose (longer than ldpipe's ~400-line rule): the cache key, the retry policy, the Batch API and the
stats all turn on one request identity, and a call's exactly-once behaviour (cached, retried, batched, resumed)
reads end to end here.

- Cache: one row per completed call, committed at once (WAL), keyed by the model name, the messages, the sampling
  params and a `sample` tag, and never by the base URL, so the same model behind another URL reuses the rows.
  A rerun makes zero repeat calls, and a run that dies keeps what it finished.
- Retries are ours (tenacity; the client's own are off): 408/409/429/5xx, timeouts, connection errors and bodies
  that are not a usable completion; exponential backoff with jitter, Retry-After honoured, at most `max_attempts`
  tries and `max_wait_s` of sleeping per item. Then an LLMError names the item and the last error.
- Bounds: `max_tokens` is sent with every request; a completion longer than `max_response_chars` (default: the
  dataset-text limit, ldpipe.data.loaders.MAX_TEXT_CHARS) is cut to that many characters, and the number of
  characters dropped is kept with it (Completion.dropped_chars, the cache row, LLMStats.clipped), so the cache never
  grows by more than the bound per call. A body over max(MAX_BODY_BYTES, 16 x max_response_chars) bytes is not
  read further and the item fails (not retried). Every synchronous item has `max_call_s` of wall time in all
  (attempts, backoff and Retry-After included; each request's timeout is the smaller of `timeout_s` and what is
  left), so a silent endpoint is given up on after max_call_s (60 s by default), not attempts x timeout_s.
- The API key is read from the environment, handed to the client and redacted from every message we make; it is
  never written to the cache.
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception

from ldpipe.data.loaders import MAX_TEXT_CHARS
from ldpipe.errors import LdpipeError, SpecError

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
_NO_KEY = "no-key"   # local servers (vLLM, llama.cpp, Ollama) ignore the key, but the client insists on one
_TERMINAL = ("completed", "failed", "expired", "cancelled")
Result = tuple[str, str | None]   # (content, finish_reason)
Stored = tuple[str, str | None, int]   # (content, finish_reason, characters dropped by the max_response_chars cut)
MAX_BODY_BYTES = 32 * 1024 * 1024    # a chat body is read up to max(this, 16 bytes per allowed character)


class LLMError(LdpipeError):
    """An LLM call that could not be completed (after retries), or a misconfigured endpoint."""

    def __init__(self, message: str, *, last_error: BaseException | None = None):
        super().__init__(message)
        self.last_error = last_error


class MalformedResponse(Exception):
    """A 2xx body that is not a usable chat completion (invalid JSON, no choices, no content)."""


class ResponseTooLarge(Exception):
    """A body past the byte cap: the endpoint ignores max_tokens; not retried (it would do it again)."""


class CallDeadline(Exception):
    """The item's max_call_s of wall time ran out."""


@dataclass(frozen=True)
class LLMConfig:
    base_url: str | None = None          # None: the official OpenAI endpoint (or OPENAI_BASE_URL)
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key, never the key
    concurrency: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    system_message: str = DEFAULT_SYSTEM
    timeout_s: float = 60.0              # per HTTP request (never more than what is left of max_call_s)
    max_call_s: float = 60.0             # wall time per item, all attempts, backoff and Retry-After included
    max_response_chars: int = MAX_TEXT_CHARS   # a longer completion is cut here (dropped chars are counted)
    max_attempts: int = 6                # per item
    max_wait_s: float = 60.0             # total backoff sleep per item
    backoff_base_s: float = 1.0          # first backoff; doubles each retry, jittered into [b/2, b]
    backoff_max_s: float = 30.0
    cache_path: Path | None = None       # None: an in-memory cache (nothing survives the process)
    use_batch_api: bool = False
    batch_poll_s: float = 30.0
    batch_max_wait_s: float = 26 * 3600.0  # polling gives up after this; a rerun resumes the same batch

    @classmethod
    def from_spec(cls, spec, *, cache_path: Path | None, **extra) -> "LLMConfig":
        """The client config of a declared endpoint (spec.LLMSpec, JudgeSpec or ScorerSpec): the fields they share
        with this config, copied; `extra` sets the rest (e.g. a judge's system message)."""
        import dataclasses

        shared = {f.name: getattr(spec, f.name) for f in dataclasses.fields(cls) if hasattr(spec, f.name)}
        return cls(**{**shared, "cache_path": cache_path, **extra})

    def validate(self) -> None:
        for name in ("concurrency", "max_attempts", "max_tokens", "max_response_chars"):
            if getattr(self, name) < 1:
                raise SpecError(f"llm config: {name} must be >= 1, got {getattr(self, name)}")
        if not self.max_call_s > 0:
            raise SpecError(f"llm config: max_call_s must be > 0, got {self.max_call_s}")
        for name in ("timeout_s", "max_wait_s", "backoff_base_s", "backoff_max_s", "batch_poll_s",
                     "batch_max_wait_s", "temperature", "top_p"):
            if getattr(self, name) < 0:
                raise SpecError(f"llm config: {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> LLMConfig:
        """base_url from LDPIPE_LLM_BASE_URL (else OPENAI_BASE_URL), model from LDPIPE_LLM_MODEL; overrides win."""
        env = os.environ if environ is None else environ
        found = {"base_url": env.get("LDPIPE_LLM_BASE_URL") or env.get("OPENAI_BASE_URL") or None,
                 "model": env.get("LDPIPE_LLM_MODEL") or None}
        return cls(**(found | overrides))


@dataclass(frozen=True)
class ChatRequest:
    item: str                               # names the item in errors and logs, e.g. "ex_0007/irr_hum"
    messages: tuple[tuple[str, str], ...]   # (role, content) pairs
    sample: str = ""   # tells independent samples of one prompt apart; part of the cache key, never sent

    @classmethod
    def chat(cls, item: str, user: str, *, system: str | None = DEFAULT_SYSTEM, sample: str = "") -> ChatRequest:
        msgs = ((("system", system),) if system else ()) + (("user", user),)
        return cls(item=item, messages=msgs, sample=sample)


@dataclass(frozen=True)
class Completion:
    item: str
    text: str
    finish_reason: str | None
    cached: bool        # True when it came from the cache without a call in this run
    dropped_chars: int = 0   # characters cut off because the completion was longer than max_response_chars


@dataclass
class LLMStats:
    requests: int = 0       # chat-completion HTTP requests sent, every attempt counted
    completed: int = 0      # new completions stored (sync and batch)
    cache_hits: int = 0     # input requests answered from the cache
    deduplicated: int = 0   # input requests sharing a cache key with an earlier one in the same call
    retries: int = 0
    failures: int = 0       # items given up on
    batch_lines: int = 0    # completions harvested from Batch API output
    batch_errors: int = 0   # batch lines that failed (then retried on the synchronous path)
    clipped: int = 0        # new completions cut to max_response_chars
    clipped_chars: int = 0  # characters those cuts dropped

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# ----------------------------------------------------------------------------- cache

class CompletionCache:
    """SQLite, WAL, autocommit: every put is durable before the next call starts."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                         "request TEXT NOT NULL, response TEXT NOT NULL, finish_reason TEXT, via TEXT NOT NULL, "
                         "created_at REAL NOT NULL, dropped_chars INTEGER NOT NULL DEFAULT 0)")
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(completions)")}
        if "dropped_chars" not in cols:   # a cache written before the bound: its rows dropped nothing
            self._db.execute("ALTER TABLE completions ADD COLUMN dropped_chars INTEGER NOT NULL DEFAULT 0")
        # Batches submitted but not yet harvested, so a rerun polls them instead of paying twice.
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, requests TEXT NOT NULL, "
                         "status TEXT NOT NULL, created_at REAL NOT NULL)")

    def get(self, key: str) -> Stored | None:
        with self._lock:
            row = self._db.execute("SELECT response, finish_reason, dropped_chars FROM completions WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else (row[0], row[1], int(row[2] or 0))

    def put(self, key: str, payload: Mapping[str, Any], text: str, finish_reason: str | None, via: str,
            dropped_chars: int = 0) -> None:
        """Store a completion; the first one stored for a key stays, unless that one was cut short (a rerun
        with a larger max_response_chars may then replace it)."""
        with self._lock:
            self._db.execute("INSERT INTO completions (key, model, request, response, finish_reason, via, "
                             "created_at, dropped_chars) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE "
                             "SET response = excluded.response, finish_reason = excluded.finish_reason, "
                             "via = excluded.via, created_at = excluded.created_at, "
                             "dropped_chars = excluded.dropped_chars WHERE completions.dropped_chars > 0",
                             (key, payload["model"], _canonical(payload), text, finish_reason, via, time.time(),
                              dropped_chars))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM completions").fetchone()[0]

    def add_batch(self, batch_id: str, requests: Mapping[str, Mapping[str, Any]]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, 'pending', ?)",
                             (batch_id, json.dumps(requests, sort_keys=True), time.time()))

    def pending_batches(self) -> list[tuple[str, dict[str, dict]]]:
        with self._lock:
            rows = self._db.execute("SELECT batch_id, requests FROM batches WHERE status = 'pending' "
                                    "ORDER BY created_at").fetchall()
        return [(b, json.loads(r)) for b, r in rows]

    def finish_batch(self, batch_id: str, status: str) -> None:
        with self._lock:
            self._db.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (status, batch_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(payload: Mapping[str, Any], sample: str = "") -> str:
    return hashlib.sha256(_canonical({"payload": payload, "sample": sample}).encode()).hexdigest()


# ----------------------------------------------------------------------------- response parsing

def parse_completion(body: Any) -> Result:
    """(content, finish_reason) from a chat-completion body (str, bytes or dict); MalformedResponse otherwise."""
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise MalformedResponse(f"response body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise MalformedResponse(f"response body is a JSON {type(body).__name__}, not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse(f"response has no choices (choices={choices!r})")
    first = choices[0] if isinstance(choices[0], dict) else {}
    content = (first.get("message") or {}).get("content")
    if not isinstance(content, str):
        raise MalformedResponse(f"choices[0].message.content is {type(content).__name__}, not a string")
    return content, first.get("finish_reason")


def batch_requests_jsonl(payloads: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The Batch API input file: one line per request, custom_id = the cache key."""
    lines = [_canonical({"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body})
             for key, body in payloads.items()]
    return ("\n".join(lines) + "\n").encode()


def parse_batch_output(text: str) -> tuple[dict[str, Result], dict[str, str]]:
    """Batch output/error file -> ({custom_id: (content, finish_reason)}, {custom_id: why it failed})."""
    done: dict[str, Result] = {}
    failed: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            cid = row["custom_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("batch output line %d is not a batch result; ignored", n)
            continue
        resp = row.get("response") or {}
        if row.get("error") or resp.get("status_code") != 200:
            failed[cid] = str(row.get("error") or f"HTTP {resp.get('status_code')}: {resp.get('body')}")[:500]
            continue
        try:
            done[cid] = parse_completion(resp.get("body"))
        except MalformedResponse as e:
            failed[cid] = str(e)
    return done, failed


# ----------------------------------------------------------------------------- retries

_RETRY_STATUS = (408, 409, 429)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APIConnectionError, MalformedResponse)):  # APITimeoutError is a connection error
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRY_STATUS or exc.status_code >= 500
    return False


def retry_after_s(exc: BaseException | None) -> float | None:
    """The server's requested delay (retry-after-ms, or Retry-After in seconds or as an HTTP date)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"connection error ({type(cause).__name__}: {cause})" if cause else "connection error"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        msg = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {exc.status_code}: {str(msg or exc.message)[:300]}"   # an HTML error page can be long
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- client

class LLMClient:
    """Wraps `openai.OpenAI`. Use `complete_many`; read `stats`; `close()` (or `with`) when done."""

    def __init__(self, config: LLMConfig, *, environ: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        config.validate()
        env = os.environ if environ is None else environ
        key = env.get(config.api_key_env) or None
        if not config.model or (key is None and not config.base_url):
            missing = [what for what, ok in (("model", config.model), (f"${config.api_key_env} or base_url",
                                                                        key or config.base_url)) if not ok]
            raise LLMError("LLM types need an endpoint: set the model (LDPIPE_LLM_MODEL or llm.model), and either "
                           f"${config.api_key_env} for OpenAI or base_url (LDPIPE_LLM_BASE_URL / OPENAI_BASE_URL) "
                           f"for a local OpenAI-compatible server; missing: {', '.join(missing)}")
        self.config = config
        self._secret = key
        self._sleep = sleep
        self._openai = openai.OpenAI(api_key=key or _NO_KEY, base_url=config.base_url, timeout=config.timeout_s,
                                     max_retries=0)
        self.cache = CompletionCache(config.cache_path)
        self.stats = LLMStats()
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"LLMClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.cache.close()
        self._openai.close()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _clip(self, item: str, text: str, finish: str | None, dropped: int = 0) -> Stored:
        """`text` cut to max_response_chars, with the count of what the cut (and any earlier one) dropped."""
        bound = self.config.max_response_chars
        if len(text) <= bound:
            return text, finish, dropped
        log.warning("LLM %s: completion of %d characters cut to max_response_chars=%d", item, len(text), bound)
        return text[:bound], finish, dropped + len(text) - bound

    def _store(self, key: str, item: str, payload: Mapping[str, Any], text: str, finish: str | None,
               via: str) -> Stored:
        done = self._clip(item, text, finish)
        self.cache.put(key, payload, done[0], done[1], via=via, dropped_chars=done[2])
        if done[2]:
            self._count(clipped=1, clipped_chars=done[2])
        return done

    def payload(self, req: ChatRequest) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"model": c.model, "messages": [{"role": r, "content": t} for r, t in req.messages],
                                "temperature": c.temperature, "top_p": c.top_p, "max_tokens": c.max_tokens}
        if c.seed is not None:
            body["seed"] = c.seed
        return body

    # ------------------------------------------------------------------ public
    def complete_many(self, requests: Sequence[ChatRequest], *,
                      progress: Callable[[int, int], None] | None = None) -> list[Completion]:
        """Completions for `requests`, in order. Cached ones cost nothing; the rest are fetched (Batch API first
        when configured), each stored as soon as it arrives. The first item that fails for good stops the run
        with an LLMError naming it; what finished before is kept in the cache. `progress(done, total)` counts the
        items that needed a call and is called from worker threads."""
        keys = [cache_key(self.payload(r), r.sample) for r in requests]
        have: dict[str, Stored] = {}
        todo: dict[str, ChatRequest] = {}
        bound = self.config.max_response_chars
        for req, key in zip(requests, keys):
            if key in have or key in todo:
                self._count(cache_hits=int(key in have), deduplicated=int(key in todo))
                continue
            hit = self.cache.get(key)
            if hit is not None and hit[2] and len(hit[0]) < bound:
                hit = None   # cut short under a smaller bound than today's: ask again
            if hit is not None:
                have[key] = self._clip(req.item, *hit)   # a row from before the bound may be longer
                self._count(cache_hits=1)
            else:
                todo[key] = req
        total, done, tick_lock = len(todo), 0, threading.Lock()

        def tick() -> None:
            nonlocal done
            with tick_lock:
                done += 1
                if progress is not None:
                    progress(done, total)

        fresh: dict[str, Stored] = {}
        if todo and self.config.use_batch_api:
            fresh = self._run_batches({k: self.payload(r) for k, r in todo.items()})
            for key in fresh:
                todo.pop(key)
                tick()
        if todo:
            fresh |= self._run_sync(todo, tick)
        out = []
        for r, k in zip(requests, keys):
            text, finish, dropped = have.get(k) or fresh[k]
            out.append(Completion(r.item, text, finish, cached=k in have, dropped_chars=dropped))
        return out

    # ------------------------------------------------------------------ synchronous path
    def _run_sync(self, todo: Mapping[str, ChatRequest], tick: Callable[[], None]) -> dict[str, Stored]:
        results: dict[str, Stored] = {}
        stop = threading.Event()   # set on the first permanent failure: queued items are then not started

        def work(key: str, req: ChatRequest) -> None:
            if stop.is_set():
                return
            payload = self.payload(req)
            deadline = time.monotonic() + self.config.max_call_s
            try:
                text, finish = self._with_retries(req.item, lambda: self._chat_once(payload, deadline),
                                                  deadline=deadline)
            except BaseException:
                stop.set()   # here, not in the main thread: this worker may take the next item at once
                raise
            results[key] = self._store(key, req.item, payload, text, finish, via="sync")
            self._count(completed=1)
            tick()

        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(todo)),
                                thread_name_prefix="ldpipe-llm") as pool:
            futures: list[Future] = [pool.submit(work, k, r) for k, r in todo.items()]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                for f in futures:
                    f.cancel()
        if failed is not None:   # the pool has drained: items in flight when it failed are cached too
            raise failed.exception()
        return results

    def _chat_once(self, payload: dict[str, Any], deadline: float) -> Result:
        c = self.config
        left = deadline - time.monotonic()
        if left <= 0:
            raise CallDeadline(f"max_call_s={c.max_call_s:g} spent")
        self._count(requests=1)
        cap = max(MAX_BODY_BYTES, 16 * c.max_response_chars)
        # The raw bytes let us judge the body ourselves (the parsed path would return a bare str for a non-JSON
        # content type and raise a JSONDecodeError for a broken JSON one), and streaming them lets us stop reading
        # at the byte cap or the deadline instead of holding whatever the server sends.
        body = bytearray()
        with self._openai.chat.completions.with_streaming_response.create(
                **payload, timeout=min(c.timeout_s, left)) as raw:
            for chunk in raw.iter_bytes():
                body += chunk
                if len(body) > cap:
                    raise ResponseTooLarge(f"response body passed {cap:,} bytes (max_tokens={c.max_tokens} "
                                           f"ignored by the endpoint?); not read further")
                if time.monotonic() > deadline:
                    raise CallDeadline(f"max_call_s={c.max_call_s:g} spent while reading the body")
        return parse_completion(bytes(body))

    def _with_retries(self, item: str, fn: Callable[[], Any], *, deadline: float | None = None) -> Any:
        c = self.config

        def wait_s(rs: RetryCallState) -> float:
            asked = retry_after_s(rs.outcome.exception() if rs.outcome else None)
            if asked is not None:
                return asked
            cap = min(c.backoff_max_s, c.backoff_base_s * 2 ** (rs.attempt_number - 1))
            return random.uniform(cap / 2, cap)

        over_budget: list[float] = []
        over_deadline: list[float] = []

        def stop(rs: RetryCallState) -> bool:  # tenacity computes the wait before asking whether to stop
            if rs.idle_for + rs.upcoming_sleep > c.max_wait_s:
                over_budget.append(rs.upcoming_sleep)
                return True
            if deadline is not None and time.monotonic() + rs.upcoming_sleep >= deadline:
                over_deadline.append(rs.upcoming_sleep)
                return True
            return rs.attempt_number >= c.max_attempts

        def before_sleep(rs: RetryCallState) -> None:
            self._count(retries=1)
            log.warning("LLM %s: attempt %d failed (%s); retrying in %.2f s", item, rs.attempt_number,
                        self._redact(describe(rs.outcome.exception())), rs.upcoming_sleep)

        retrying = Retrying(retry=retry_if_exception(is_transient), wait=wait_s, stop=stop,
                            before_sleep=before_sleep, sleep=self._sleep, reraise=True)
        try:
            return retrying(fn)
        except Exception as e:
            self._count(failures=1)
            n = retrying.statistics.get("attempt_number", 1)
            if isinstance(e, CallDeadline):
                why = f"gave up after {n} attempt(s): its max_call_s={c.max_call_s:g} of wall time ran out"
            elif not is_transient(e):
                why = "not retryable"
            else:
                why = f"gave up after {n} attempt(s) and {retrying.statistics.get('idle_for', 0):.2f} s of backoff"
                if over_budget:
                    why += f"; the next wait of {over_budget[-1]:.2f} s would pass max_wait_s={c.max_wait_s:g}"
                elif over_deadline:
                    why += (f"; the next attempt would pass the call's max_call_s={c.max_call_s:g} of wall time "
                            f"(timeout_s={c.timeout_s:g} per request)")
            raise LLMError(f"LLM request for {item!r} failed ({why}); last error: {self._redact(describe(e))}",
                           last_error=e) from None

    # ------------------------------------------------------------------ Batch API path
    def _run_batches(self, payloads: dict[str, dict[str, Any]]) -> dict[str, Stored]:
        """Fill the cache through the Batch API; returns what it filled. Batches left pending by an interrupted
        run are polled first. Lines that failed are left for the synchronous path."""
        filled: dict[str, Stored] = {}
        for batch_id, reqs in self.cache.pending_batches():
            if not any(k in payloads for k in reqs):
                continue
            try:
                filled |= {k: v for k, v in self._harvest(batch_id, reqs).items() if k in payloads}
            except LLMError as e:
                if not isinstance(e.last_error, openai.NotFoundError):
                    raise
                # e.g. the same model now served from another base URL: that batch is gone, submit afresh
                log.warning("LLM batch %s is unknown to this endpoint; its requests are sent again", batch_id)
                self.cache.finish_batch(batch_id, "not_found")
        rest = {k: p for k, p in payloads.items() if k not in filled}
        if not rest:
            return filled
        data = batch_requests_jsonl(rest)
        upload = self._with_retries("batch upload", lambda: self._openai.files.create(
            file=("ldpipe-batch.jsonl", data, "application/jsonl"), purpose="batch"))
        batch = self._with_retries("batch create", lambda: self._openai.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"))
        self.cache.add_batch(batch.id, rest)   # recorded before polling, so a crash here loses nothing paid for
        log.info("LLM batch %s submitted with %d request(s)", batch.id, len(rest))
        return filled | self._harvest(batch.id, rest)

    def _harvest(self, batch_id: str, requests: Mapping[str, Mapping[str, Any]]) -> dict[str, Stored]:
        deadline = time.monotonic() + self.config.batch_max_wait_s
        while True:
            batch = self._with_retries(f"batch {batch_id} poll", lambda: self._openai.batches.retrieve(batch_id))
            if batch.status in _TERMINAL:
                break
            if time.monotonic() >= deadline:
                raise LLMError(f"LLM batch {batch_id} is still {batch.status!r} after "
                               f"{self.config.batch_max_wait_s:.0f} s; rerun to resume polling it")
            self._sleep(self.config.batch_poll_s)
        done: dict[str, Result] = {}
        failed: dict[str, str] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):  # expired batches keep partial output
            if file_id:
                text = self._with_retries(f"batch {batch_id} download",
                                          lambda: self._openai.files.content(file_id).text)
                d, f = parse_batch_output(text)
                done |= d
                failed |= f
        filled = {key: self._store(key, f"batch {batch_id} line {key[:12]}", requests[key], text, finish,
                                   via=f"batch:{batch_id}")
                  for key, (text, finish) in done.items() if key in requests}
        self._count(batch_lines=len(filled), completed=len(filled), batch_errors=len(failed))
        if failed:
            log.warning("LLM batch %s: %d line(s) failed (first: %s); they go through the synchronous path",
                        batch_id, len(failed), self._redact(next(iter(failed.values()))))
        if batch.status != "completed":
            errs = getattr(batch.errors, "data", None) or []
            log.warning("LLM batch %s ended %r: %s", batch_id, batch.status, [e.message for e in errs][:3])
        self.cache.finish_batch(batch_id, batch.status)
        return filled


__all__ = ["LLMConfig", "LLMClient", "LLMError", "LLMStats", "ChatRequest", "Completion", "CompletionCache",
           "MalformedResponse", "ResponseTooLarge", "CallDeadline", "MAX_BODY_BYTES", "cache_key", "parse_completion",
           "batch_requests_jsonl", "parse_batch_output", "is_transient", "retry_after_s", "DEFAULT_SYSTEM"]
