"""LLM-made probe types against a real local HTTP server speaking the OpenAI API (tests/fake_openai.py)."""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import httpx2
import openai
import polars as pl
import pytest
from fake_openai import FakeOpenAI, Fault  # tests/ is on sys.path (pytest's default "prepend" import mode)

import ldpipe.llm
from ldpipe.data.loaders import MAX_TEXT_CHARS
from ldpipe.data.synthetic import SyntheticConfig, generate
from ldpipe.errors import DataValidationError, LdpipeError, SpecError
from ldpipe.llm import (
    ChatRequest,
    LLMClient,
    LLMConfig,
    LLMError,
    batch_requests_jsonl,
    cache_key,
    parse_batch_output,
    retry_after_s,
)
from ldpipe.probes.build import REPHRASE_TYPES, ProbeRecipe, build_probe_set
from ldpipe.probes.checks import check_probe_set
from ldpipe.probes.llm_types import LLM_TYPES, build_llm_types, strip_preamble
from ldpipe.schema import PROBE_SCHEMA
from ldpipe.spec import LLMSpec

SECRET = "sk-test-SECRET-0123456789abcdef"
KEY_ENV = "LDPIPE_TEST_LLM_KEY"
MODEL = "fake-model"
# The reference's prompts, typed out here (docs/glossary.md) rather than imported, so a drift is caught.
SEMANTIC = ("Given the reference sentence, please generate an output sentence. Please use different words as much as "
            "possible while keeping the meaning of the reference sentence unchanged. Please only return the output "
            "sentence.\n\nReference sentence: {}\n\nOutput: ")
FORMAT = ("Given the reference sentence, please generate an output sentence. Please change the meaning of the "
          "reference sentence as much as possible while keeping the format of it. Please only return the output "
          "sentence.\n\nReference sentence: {}\n\nOutput: ")


@pytest.fixture(scope="module")
def probes() -> pl.DataFrame:
    """Chosen/rejected probe rows from the synthetic world, plus one hand-made example whose y+ has no
    leading space (so both sides of the leading-space convention are exercised)."""
    world = generate(SyntheticConfig(n_entities=16, n_train=32, n_test=8, corpus_docs=0))
    built = build_probe_set(world.preferences, ProbeRecipe(n_examples=5, types=("chosen", "rejected"))).probes
    extra = pl.DataFrame([("zz-hand", "chosen", "\n\nHuman: hi\n\nAssistant:", "No leading space here.", "hand"),
                          ("zz-hand", "rejected", "\n\nHuman: hi\n\nAssistant:", " Go away now.", "hand")],
                         schema=PROBE_SCHEMA, orient="row")
    return pl.concat([built, extra])


def make_client(srv: FakeOpenAI | None, tmp_path: Path, *, sleeps: list[float] | None = None,
                **overrides) -> LLMClient:
    cfg = dict(base_url=srv.base_url if srv else None, model=MODEL, api_key_env=KEY_ENV,
               cache_path=tmp_path / "llm.sqlite", backoff_base_s=0.01, backoff_max_s=0.08, max_wait_s=2.0,
               timeout_s=2.0, max_attempts=4, batch_poll_s=0.01)
    cfg.update(overrides)

    def sleep(s: float) -> None:  # real sleeping, recorded
        if sleeps is not None:
            sleeps.append(s)
        time.sleep(s)

    return LLMClient(LLMConfig(**cfg), environ={KEY_ENV: SECRET}, sleep=sleep)


def by_key(frame: pl.DataFrame) -> dict[tuple[str, str], str]:
    return {(i, t): r for i, t, r in frame.select("example_id", "response_type", "response").iter_rows()}


def reversed_words(text: str) -> str:
    return " ".join(text.strip().split(" ")[::-1])


def requests_for(srv: FakeOpenAI, needle: str) -> int:
    return sum(needle in b["messages"][-1]["content"] for b in srv.chat_bodies)


# ----------------------------------------------------------------------------- happy path

def test_llm_types_content_provenance_and_leading_space(server: FakeOpenAI, probes: pl.DataFrame,
                                                        tmp_path: Path) -> None:
    with make_client(server, tmp_path) as client:
        frame, report = build_llm_types(probes, client)
    src = by_key(probes)
    ids = sorted({i for i, _ in src})
    assert frame.schema == pl.Schema(PROBE_SCHEMA)
    assert frame.height == len(ids) * len(LLM_TYPES)
    got = by_key(frame)
    for i in ids:
        for t, source in (("chosen_gptsemantic", "chosen"), ("reject_gptsemantic", "rejected"),
                          ("chosen_gptformat", "chosen"), ("reject_gptformat", "rejected"), ("irr_hum", "chosen")):
            y = src[(i, source)]
            lead = " " if y.startswith(" ") else ""
            if t == "irr_hum":   # the fake model answers "word0 word1 ..." with the requested count
                assert got[(i, t)] == lead + " ".join(f"word{k}" for k in range(len(y.strip().split(" "))))
            elif "semantic" in t:
                assert got[(i, t)] == lead + reversed_words(y)
            else:
                assert got[(i, t)] == lead + reversed_words(y).upper()
    assert got[("zz-hand", "chosen_gptsemantic")] == "here. space leading No"      # no space in, none out
    assert got[("zz-hand", "reject_gptsemantic")] == " now. away Go"
    assert sum(r.startswith(" ") for r in got.values()) > len(got) // 2          # HH-style sources dominate
    prov = dict(frame.select("response_type", "provenance").unique().iter_rows())
    assert prov == {"chosen_gptsemantic": f"llm:{MODEL}:gptsemantic", "reject_gptsemantic": f"llm:{MODEL}:gptsemantic",
                    "chosen_gptformat": f"llm:{MODEL}:gptformat", "reject_gptformat": f"llm:{MODEL}:gptformat",
                    "irr_hum": f"llm:{MODEL}:random_sentence"}
    prompts = dict(probes.select("example_id", "prompt").unique().iter_rows())
    assert all(prompts[i] == p for i, p in frame.select("example_id", "prompt").iter_rows())
    assert report == {t: {"made": len(ids), "preambles_stripped": 0, "from_cache": 0, "empty": 0, "truncated": 0,
                          "over_max_response_chars": 0, "chars_dropped": 0, "identical_to_source": 0}
                      for t in LLM_TYPES}

    # What went over the wire: the reference's prompts, system message and sampling params, and the key.
    users = [b["messages"][-1]["content"] for b in server.chat_bodies]
    assert SEMANTIC.format(src[("zz-hand", "chosen")]) in users
    assert FORMAT.format(src[("zz-hand", "rejected")].strip()) in users
    assert "Please generate a random sentence with 4 words." in users
    assert {(b["messages"][0]["role"], b["messages"][0]["content"]) for b in server.chat_bodies} == \
        {("system", "You are a helpful assistant.")}
    assert {(b["model"], b["temperature"], b["top_p"]) for b in server.chat_bodies} == {(MODEL, 0.7, 1.0)}
    assert server.auth_headers == {f"Bearer {SECRET}"}
    # y_hum is sampled per example even where two examples ask for the same word count
    n_words = [len(src[(i, "chosen")].strip().split(" ")) for i in ids]
    assert len(set(n_words)) < len(n_words)
    assert requests_for(server, "random sentence") == len(ids)

    # The frame plugs into the offline builder as its rephrases table.
    world = generate(SyntheticConfig(n_entities=16, n_train=32, n_test=8, corpus_docs=0))
    rebuilt = build_probe_set(world.preferences, ProbeRecipe(n_examples=5, types=("chosen", "rejected",
                                                                                   *REPHRASE_TYPES)),
                              rephrases=frame)
    assert rebuilt.skipped == {}
    checked = check_probe_set(rebuilt.probes, ("chosen", "rejected", *REPHRASE_TYPES))
    assert checked["n_missing"] == 0 and checked["rephrases_identical_to_source"] == 0


def test_complete_many_keeps_order_and_dedupes(server: FakeOpenAI, tmp_path: Path) -> None:
    server.fail_prompt("alpha", Fault("delay", seconds=0.4))   # the first request finishes last
    reqs = [ChatRequest.chat(f"item{k}", w) for k, w in enumerate(["alpha one", "beta two", "gamma three",
                                                                    "beta two", "delta four"])]
    done: list[tuple[int, int]] = []
    with make_client(server, tmp_path, concurrency=4) as client:
        out = client.complete_many(reqs, progress=lambda d, n: done.append((d, n)))
        stats = client.stats
    assert [c.item for c in out] == [r.item for r in reqs]
    assert [c.text for c in out] == ["one alpha", "two beta", "three gamma", "two beta", "four delta"]
    assert server.n_chat == 4 and stats.deduplicated == 1 and stats.requests == 4
    assert sorted(done) == [(k, 4) for k in range(1, 5)]


# ----------------------------------------------------------------------------- faults and retries

@pytest.mark.parametrize("fault", [Fault("429", retry_after="0.2"), Fault("500"), Fault("503"),
                                   Fault("delay", seconds=1.0), Fault("reset"), Fault("bad_json"),
                                   Fault("empty_choices")], ids=lambda f: f.kind)
def test_each_fault_is_retried_then_succeeds(server: FakeOpenAI, tmp_path: Path, fault: Fault,
                                             caplog: pytest.LogCaptureFixture) -> None:
    server.fail_prompt("victim", fault)
    sleeps: list[float] = []
    reqs = [ChatRequest.chat("ok-item", "fine request"), ChatRequest.chat("victim-item", "victim request")]
    with caplog.at_level(logging.WARNING, logger="ldpipe.llm"), \
            make_client(server, tmp_path, sleeps=sleeps, timeout_s=0.3) as client:
        out = client.complete_many(reqs)
        stats = client.stats
    assert [c.text for c in out] == ["request fine", "request victim"]
    assert requests_for(server, "victim") == 2 and stats.retries == 1 and stats.failures == 0
    if fault.kind == "429":
        assert sleeps == [0.2]                     # Retry-After honoured, not the 0.01 s backoff
    else:
        assert len(sleeps) == 1 and 0.005 <= sleeps[0] <= 0.01
    assert "victim-item" in caplog.text and "attempt 1 failed" in caplog.text


def test_backoff_doubles_with_jitter(server: FakeOpenAI, tmp_path: Path) -> None:
    server.fail_prompt("flaky", Fault("500"), Fault("503"), Fault("500"))
    sleeps: list[float] = []
    with make_client(server, tmp_path, sleeps=sleeps, backoff_base_s=0.02, backoff_max_s=1.0) as client:
        assert client.complete_many([ChatRequest.chat("f", "flaky one")])[0].text == "one flaky"
    assert len(sleeps) == 3
    for k, s in enumerate(sleeps):
        assert 0.01 * 2 ** k <= s <= 0.02 * 2 ** k


def test_attempts_are_bounded_and_the_error_names_the_item(server: FakeOpenAI, tmp_path: Path) -> None:
    server.fail_prompt("doomed", forever=Fault("503"))
    with make_client(server, tmp_path, max_attempts=3) as client:
        with pytest.raises(LLMError, match=r"'ex-7/irr_hum'.*3 attempt\(s\).*HTTP 503"):
            client.complete_many([ChatRequest.chat("ex-7/irr_hum", "doomed")])
        assert client.stats.failures == 1
    assert requests_for(server, "doomed") == 3


def test_retry_after_beyond_the_wait_budget_fails_at_once(server: FakeOpenAI, tmp_path: Path) -> None:
    server.fail_prompt("slowdown", Fault("429", retry_after="30"))
    sleeps: list[float] = []
    with make_client(server, tmp_path, sleeps=sleeps, max_wait_s=1.0) as client:
        with pytest.raises(LLMError, match=r"next wait of 30.00 s would pass max_wait_s=1.*HTTP 429"):
            client.complete_many([ChatRequest.chat("s", "slowdown")])
    assert sleeps == [] and requests_for(server, "slowdown") == 1


def test_client_errors_are_not_retried(server: FakeOpenAI, tmp_path: Path) -> None:
    server.fail_prompt("bad", Fault("400"))
    with make_client(server, tmp_path) as client:
        with pytest.raises(LLMError, match=r"'b-item'.*not retryable.*HTTP 400"):
            client.complete_many([ChatRequest.chat("b-item", "bad request")])
    assert requests_for(server, "bad") == 1


def test_retry_after_header_forms() -> None:
    def exc(headers: dict[str, str]) -> openai.RateLimitError:
        req = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
        return openai.RateLimitError("429", response=httpx2.Response(429, headers=headers, request=req), body=None)

    assert retry_after_s(exc({"retry-after": "3"})) == 3.0
    assert retry_after_s(exc({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    assert 100 < retry_after_s(exc({"retry-after": date})) <= 120
    assert retry_after_s(exc({})) is None and retry_after_s(exc({"retry-after": "soon"})) is None


# ----------------------------------------------------------------------------- cache

def test_failure_keeps_earlier_completions_and_a_rerun_only_asks_for_the_rest(server: FakeOpenAI,
                                                                              tmp_path: Path) -> None:
    server.fail_prompt("third", forever=Fault("500"))
    reqs = [ChatRequest.chat(f"r{k}", f"{w} words here") for k, w in enumerate(["first", "second", "third",
                                                                                "fourth"])]
    with make_client(server, tmp_path, concurrency=1, max_attempts=2) as client:
        with pytest.raises(LLMError, match="'r2'"):
            client.complete_many(reqs)
    assert requests_for(server, "fourth") == 0            # the run stopped at the first permanent failure
    with sqlite3.connect(tmp_path / "llm.sqlite") as db:  # read by another connection: the rows are committed
        rows = dict(db.execute("SELECT key, response FROM completions").fetchall())
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sorted(rows.values()) == ["here words first", "here words second"]

    server.clear_faults()
    before = server.n_chat
    with make_client(server, tmp_path, concurrency=1) as client:
        out = client.complete_many(reqs)
        assert client.stats.cache_hits == 2
    assert server.n_chat - before == 2
    assert [c.cached for c in out] == [True, True, False, False]
    assert [c.text for c in out][2:] == ["here words third", "here words fourth"]


def test_rerun_makes_zero_requests_and_ignores_the_base_url(server: FakeOpenAI, probes: pl.DataFrame,
                                                            tmp_path: Path) -> None:
    with make_client(server, tmp_path) as client:
        first, _ = build_llm_types(probes, client)
    n = server.n_requests
    # Nothing listens on port 9: any request would fail, so passing proves there were none.
    with make_client(None, tmp_path, base_url="http://127.0.0.1:9/v1", max_attempts=1) as client:
        again, report = build_llm_types(probes, client)
        assert client.stats.requests == 0
    assert server.n_requests == n
    assert again.equals(first)
    assert all(r["from_cache"] == r["made"] for r in report.values())
    # a changed sampling parameter is a different request
    with make_client(server, tmp_path, temperature=0.2) as client:
        build_llm_types(probes, client, types=("chosen_gptsemantic",))
    assert server.n_requests > n


def test_cache_key_covers_model_messages_params_and_sample() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.7, "top_p": 1.0,
            "max_tokens": 8}
    keys = {cache_key(body), cache_key(body, "ex-1"), cache_key(body | {"model": "m2"}),
            cache_key(body | {"temperature": 0.1}), cache_key(body | {"max_tokens": 9}),
            cache_key(body | {"messages": [{"role": "user", "content": "y"}]}), cache_key(body | {"seed": 3})}
    assert len(keys) == 7
    assert cache_key(dict(reversed(body.items()))) == cache_key(body)


# ----------------------------------------------------------------------------- concurrency

@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit_is_respected(server: FakeOpenAI, tmp_path: Path, limit: int) -> None:
    server.latency_s = 0.08
    reqs = [ChatRequest.chat(f"c{k}", f"request number {k}") for k in range(9)]
    with make_client(server, tmp_path, concurrency=limit) as client:
        out = client.complete_many(reqs)
    assert [c.text for c in out] == [f"{k} number request" for k in range(9)]
    assert server.max_in_flight == limit


# ----------------------------------------------------------------------------- preambles

def test_strip_preamble() -> None:
    cases = {
        "Sure! Here is a random sentence with 12 words:\n\nThe cat sat.": ("The cat sat.", True),
        "Certainly! Here is a random sentence with exactly 64 words: Dogs run.": ("Dogs run.", True),
        "Here's the rephrased sentence:\n\"I can help you.\"": ("I can help you.", True),
        "Output: I can help you.": ("I can help you.", True),
        "“Smart quotes.”": ("Smart quotes.", True),
        "  Plain text.  ": ("Plain text.", False),
        # content that merely looks chatty stays
        "Sure, I can help with that. First, preheat.": ("Sure, I can help with that. First, preheat.", False),
        "Here are some ideas: cook, read.": ("Here are some ideas: cook, read.", False),
        '"Hi," she said. "Bye."': ('"Hi," she said. "Bye."', False),
        "'I don't know'": ("'I don't know'", False),
        "Output:": ("Output:", False),     # nothing but a label: kept, so the bad row stays visible
    }
    for text, expected in cases.items():
        assert strip_preamble(text) == expected, text


def test_preambles_are_stripped_and_counted(server: FakeOpenAI, probes: pl.DataFrame, tmp_path: Path) -> None:
    marked: dict[str, int] = {"random": 0, "meaning": 0, "format": 0}

    def chatty(user: str, reply: str) -> str:
        n = len(server.chat_bodies)     # decorate every other request
        if n % 2:
            return reply
        if user.startswith("Please generate a random sentence"):
            marked["random"] += 1
            words = user.split(" ")[-2]
            return f"Certainly! Here is a random sentence with exactly {words} words:\n\n{reply}"
        if "change the meaning" in user:
            marked["format"] += 1
            return f'Output: "{reply}"'
        marked["meaning"] += 1
        return f"Sure! Here's the rephrased sentence:\n\n{reply}"

    server.decorate = chatty
    with make_client(server, tmp_path) as client:
        frame, report = build_llm_types(probes, client)
    src = by_key(probes)
    got = by_key(frame)
    for (i, t), text in got.items():
        if t == "chosen_gptsemantic":
            assert text == (" " if src[(i, "chosen")].startswith(" ") else "") + reversed_words(src[(i, "chosen")])
    assert marked["random"] > 0 and marked["meaning"] > 0 and marked["format"] > 0
    assert report["irr_hum"]["preambles_stripped"] == marked["random"]
    assert report["chosen_gptsemantic"]["preambles_stripped"] + report["reject_gptsemantic"]["preambles_stripped"] \
        == marked["meaning"]
    assert report["chosen_gptformat"]["preambles_stripped"] + report["reject_gptformat"]["preambles_stripped"] \
        == marked["format"]
    assert not any("Here" in r or "Output" in r or '"' in r for r in got.values())


def test_truncated_outputs_are_counted(server: FakeOpenAI, probes: pl.DataFrame, tmp_path: Path) -> None:
    with make_client(server, tmp_path, max_tokens=13) as client:
        frame, report = build_llm_types(probes, client, types=("irr_hum",))
    long = [i for (i, t), y in by_key(probes).items() if t == "chosen" and len(y.strip().split(" ")) > 13]
    assert 0 < len(long) < frame.height
    assert report["irr_hum"]["truncated"] == len(long)
    assert {b["max_tokens"] for b in server.chat_bodies} == {13}
    assert all(len(r.strip().split(" ")) <= 13 for r in frame["response"])


def test_a_source_that_opens_like_a_preamble_keeps_its_rephrase(server: FakeOpenAI, tmp_path: Path) -> None:
    probes = pl.DataFrame([("e1", "chosen", "P", " Here's the sentence you need: call me.", "d")],
                          schema=PROBE_SCHEMA, orient="row")
    server.decorate = lambda user, reply: "Here is the sentence you want: phone me."
    with make_client(server, tmp_path) as client:
        frame, report = build_llm_types(probes, client, types=("chosen_gptsemantic",))
    assert frame["response"].to_list() == [" Here is the sentence you want: phone me."]
    assert report["chosen_gptsemantic"]["preambles_stripped"] == 0


# ----------------------------------------------------------------------------- secrets

def test_key_never_reaches_cache_frame_logs_or_errors(server: FakeOpenAI, probes: pl.DataFrame, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    server.fail_request(2, Fault("500"))                   # a logged retry
    caplog.set_level(logging.DEBUG)                        # every logger: ours, openai's, the HTTP client's
    with make_client(server, tmp_path) as client:
        frame, _ = build_llm_types(probes, client)
        server.fail_prompt("leaky", Fault("401"))          # a server that echoes the key in its error
        with pytest.raises(LLMError) as err:
            client.complete_many([ChatRequest.chat("leak-item", "leaky")])
        shown = repr(client) + repr(client.config)
    assert SECRET in server.auth_headers.pop().removeprefix("Bearer ")  # the key was really in use
    assert "Incorrect API key provided: ***" in str(err.value) and SECRET not in str(err.value)
    assert caplog.records and SECRET not in caplog.text and SECRET not in shown
    files = list(tmp_path.glob("llm.sqlite*"))
    assert files and not any(SECRET.encode() in f.read_bytes() for f in files)
    assert not any(SECRET in str(v) for row in frame.iter_rows() for v in row)


# ----------------------------------------------------------------------------- configuration

def test_missing_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LdpipeError, match="LLM types need an endpoint.*missing: model"):
        LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1"), environ={})
    with pytest.raises(LLMError, match=r"LLM types need an endpoint.*missing: \$OPENAI_API_KEY or base_url"):
        LLMClient(LLMConfig(model="gpt-3.5-turbo"), environ={})
    # a local server needs no key
    LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1", model="m"), environ={}).close()
    cfg = LLMConfig.from_env({"LDPIPE_LLM_BASE_URL": "http://h/v1", "LDPIPE_LLM_MODEL": "qwen"}, concurrency=2)
    assert (cfg.base_url, cfg.model, cfg.concurrency) == ("http://h/v1", "qwen", 2)
    with pytest.raises(SpecError, match="concurrency"):
        LLMClient(LLMConfig(model="m", base_url="http://h/v1", concurrency=0), environ={})


def test_bad_probe_tables_and_types(server: FakeOpenAI, probes: pl.DataFrame, tmp_path: Path) -> None:
    with make_client(server, tmp_path) as client:
        only_chosen = probes.filter(pl.col("response_type") == "chosen")
        with pytest.raises(DataValidationError, match=r"probes.*has no 'rejected' row.*'reject_gptformat'"):
            build_llm_types(only_chosen, client, types=("reject_gptformat",))
        with pytest.raises(DataValidationError, match=r"probes, row 2, field 'response_type': duplicate"):
            build_llm_types(pl.concat([probes.head(2), probes.head(1)]), client, types=("chosen_gptsemantic",))
        with pytest.raises(DataValidationError, match="missing column"):
            build_llm_types(probes.drop("prompt"), client)
        with pytest.raises(SpecError, match="unknown type.*'chosen'"):
            build_llm_types(probes, client, types=("chosen",))
        # chosen-only types do not need rejected rows
        frame, _ = build_llm_types(only_chosen, client, types=("irr_hum",))
        assert frame.height == only_chosen.height
    assert server.n_chat == only_chosen.height


# ----------------------------------------------------------------------------- Batch API

def test_batch_path_fills_the_cache_and_failed_lines_go_sync(server: FakeOpenAI, probes: pl.DataFrame,
                                                             tmp_path: Path) -> None:
    with make_client(server, tmp_path / "sync") as client:
        expected, _ = build_llm_types(probes, client)
    sync_chats = server.n_chat
    server.batch_fail_substring = "No leading space here."     # its two rephrase lines fail inside the batch
    with make_client(server, tmp_path / "batch", use_batch_api=True) as client:
        frame, report = build_llm_types(probes, client)
        stats = client.stats
    assert frame.equals(expected)
    assert [b["status"] for b in server.batches.values()] == ["completed"]
    assert server.n_chat - sync_chats == 2 == stats.batch_errors            # only the failed lines went sync
    assert stats.batch_lines == frame.height - 2 == server.n_batch_lines - 2
    n = server.n_requests
    with make_client(server, tmp_path / "batch", use_batch_api=True) as client:
        again, _ = build_llm_types(probes, client)
    assert server.n_requests == n and again.equals(expected)


def test_an_interrupted_batch_is_resumed_not_resubmitted(server: FakeOpenAI, probes: pl.DataFrame,
                                                         tmp_path: Path) -> None:
    server.batch_polls = 3
    with make_client(server, tmp_path, use_batch_api=True, batch_max_wait_s=0.0) as client:
        with pytest.raises(LLMError, match=r"batch batch_\w+ is still 'in_progress'.*rerun to resume"):
            build_llm_types(probes, client, types=("irr_hum",))
    uploads = len(server.files)
    with make_client(server, tmp_path, use_batch_api=True) as client:
        frame, _ = build_llm_types(probes, client, types=("irr_hum",))
    assert len(server.batches) == 1 and len(server.files) == uploads + 1   # + the output file, no new upload
    assert server.n_chat == 0 and frame.height == probes["example_id"].n_unique()


def test_a_batch_unknown_to_a_new_endpoint_is_resubmitted(server: FakeOpenAI, probes: pl.DataFrame,
                                                            tmp_path: Path) -> None:
    server.batch_polls = 3
    with make_client(server, tmp_path, use_batch_api=True, batch_max_wait_s=0.0) as client:
        with pytest.raises(LLMError, match="rerun to resume"):
            build_llm_types(probes, client, types=("irr_hum",))
    with FakeOpenAI() as other:    # same model, another server: it never saw that batch
        with make_client(other, tmp_path, use_batch_api=True) as client:
            frame, _ = build_llm_types(probes, client, types=("irr_hum",))
        assert len(other.batches) == 1 and other.n_batch_lines == frame.height and other.n_chat == 0
    with sqlite3.connect(tmp_path / "llm.sqlite") as db:
        assert sorted(db.execute("SELECT status FROM batches").fetchall()) == [("completed",), ("not_found",)]


def test_batch_request_file_and_result_parsing() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    lines = batch_requests_jsonl({"k1": body, "k2": body | {"seed": 1}}).decode().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["custom_id"] for r in rows] == ["k1", "k2"]
    assert {(r["method"], r["url"]) for r in rows} == {("POST", "/v1/chat/completions")}
    assert rows[1]["body"]["seed"] == 1

    def ok(cid: str, content: str) -> str:
        return json.dumps({"custom_id": cid, "error": None, "response": {"status_code": 200, "body": {
            "choices": [{"message": {"content": content}, "finish_reason": "stop"}]}}})

    text = "\n".join([
        ok("a", "hello"),
        json.dumps({"custom_id": "b", "error": None, "response": {"status_code": 429, "body": {"error": "slow"}}}),
        json.dumps({"custom_id": "c", "error": {"code": "x", "message": "boom"}, "response": None}),
        json.dumps({"custom_id": "d", "error": None, "response": {"status_code": 200, "body": {"choices": []}}}),
        "not json at all", "",
    ])
    done, failed = parse_batch_output(text)
    assert done == {"a": ("hello", "stop")}
    assert set(failed) == {"b", "c", "d"} and "429" in failed["b"] and "boom" in failed["c"]
    assert "no choices" in failed["d"]


# ----------------------------------------------------------------------------- output bounds (issue 22 item 4)

def test_a_huge_completion_is_cut_to_the_bound_counted_and_the_cache_stays_small(server: FakeOpenAI,
                                                                                probes: pl.DataFrame,
                                                                                tmp_path: Path) -> None:
    # An endpoint that ignores max_tokens and answers 50,000 characters past the default bound (dataset text's).
    huge = MAX_TEXT_CHARS + 50_000
    server.fail_prompt("Reference sentence", forever=Fault("huge", chars=huge))
    with make_client(server, tmp_path) as client:
        assert client.config.max_response_chars == MAX_TEXT_CHARS
        frame, report = build_llm_types(probes, client, types=("chosen_gptsemantic", "irr_hum"))
        stats = client.stats
    n = frame.filter(pl.col("response_type") == "chosen_gptsemantic").height
    lengths = dict(frame.group_by("response_type").agg(pl.col("response").str.len_chars().max()).iter_rows())
    assert lengths["chosen_gptsemantic"] <= MAX_TEXT_CHARS + 1   # + the source's leading space
    assert report["chosen_gptsemantic"]["over_max_response_chars"] == n
    assert report["chosen_gptsemantic"]["chars_dropped"] == n * 50_000
    assert report["irr_hum"]["over_max_response_chars"] == 0     # the well-behaved answers are untouched
    assert stats.clipped == n and stats.clipped_chars == n * 50_000
    assert {b["max_tokens"] for b in server.chat_bodies} == {256}   # the endpoint was asked for a bound too
    with sqlite3.connect(tmp_path / "llm.sqlite") as db:
        rows = db.execute("SELECT max(length(response)), sum(dropped_chars) FROM completions").fetchone()
    assert rows == (MAX_TEXT_CHARS, n * 50_000)
    cache_bytes = sum(f.stat().st_size for f in tmp_path.glob("llm.sqlite*"))
    assert cache_bytes < (n + 2) * MAX_TEXT_CHARS * 1.5, cache_bytes   # not n x 150,000 and more

    # A rerun answers from the cache with the same count, and makes no request.
    before = server.n_chat
    with make_client(server, tmp_path) as client:
        _, again = build_llm_types(probes, client, types=("chosen_gptsemantic",))
    assert server.n_chat == before
    assert again["chosen_gptsemantic"]["from_cache"] == n
    assert again["chosen_gptsemantic"]["chars_dropped"] == n * 50_000


def test_a_larger_bound_asks_again_for_what_was_cut(server: FakeOpenAI, tmp_path: Path) -> None:
    server.fail_prompt("long", forever=Fault("huge", chars=1000))
    req = [ChatRequest.chat("it", "long one")]
    with make_client(server, tmp_path, max_response_chars=100) as client:
        first = client.complete_many(req)[0]
    assert (len(first.text), first.dropped_chars, first.cached) == (100, 900, False)
    with make_client(server, tmp_path, max_response_chars=50) as client:   # a smaller bound cuts the cached row
        assert (len((c := client.complete_many(req)[0]).text), c.dropped_chars, c.cached) == (50, 950, True)
    with make_client(server, tmp_path, max_response_chars=5000) as client:
        second = client.complete_many(req)[0]
    assert (len(second.text), second.dropped_chars, second.cached) == (1000, 0, False)
    with make_client(server, tmp_path, max_response_chars=5000) as client:
        assert client.complete_many(req)[0].cached
    assert requests_for(server, "long") == 2


def test_a_body_past_the_byte_cap_is_not_read_on_and_not_retried(server: FakeOpenAI, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ldpipe.llm, "MAX_BODY_BYTES", 200_000)
    server.fail_prompt("flood", forever=Fault("huge", chars=3_000_000))
    with make_client(server, tmp_path, max_response_chars=1000) as client:
        with pytest.raises(LLMError, match=r"'flood-item'.*not retryable.*passed 200,000 bytes"):
            client.complete_many([ChatRequest.chat("flood-item", "flood")])
        assert len(client.cache) == 0
    assert requests_for(server, "flood") == 1


def test_a_silent_endpoint_is_given_up_on_within_max_call_s(server: FakeOpenAI, tmp_path: Path) -> None:
    # Many attempts allowed, a generous backoff budget: only the per-call wall-time bound can stop this early.
    server.fail_prompt("hush", forever=Fault("silent"))
    with make_client(server, tmp_path, timeout_s=0.5, max_call_s=1.2, max_attempts=50, max_wait_s=60) as client:
        t0 = time.monotonic()
        with pytest.raises(LLMError, match=r"'quiet'.*max_call_s=1\.2"):
            client.complete_many([ChatRequest.chat("quiet", "hush now")])
        took = time.monotonic() - t0
    # it waited out its bound, and stopped after the requests that fit in it: 50 attempts of 0.5 s would take 25 s
    assert took >= 1.0, took
    assert 1 <= requests_for(server, "hush") <= 3


def test_output_bound_defaults_are_declared_and_agree() -> None:
    spec = LLMSpec(model="m")
    cfg = LLMConfig.from_spec(spec, cache_path=None)
    assert spec.max_response_chars == cfg.max_response_chars == LLMConfig().max_response_chars == MAX_TEXT_CHARS
    assert spec.max_call_s == cfg.max_call_s == LLMConfig().max_call_s == 60   # a silent endpoint: 60 s, not ~7 min
    assert LLMConfig.from_spec(LLMSpec(model="m", max_response_chars=10, max_call_s=5),
                               cache_path=None).max_response_chars == 10
    for bad in ({"max_response_chars": 0}, {"max_call_s": 0}):
        with pytest.raises(SpecError):
            LLMConfig(model="m", **bad).validate()
