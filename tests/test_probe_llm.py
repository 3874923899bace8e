"""LLM-made probe types inside the probe-set stage, against a real local OpenAI-compatible server."""
import polars as pl
from fake_openai import FakeOpenAI

from ldpipe import pipeline
from ldpipe.paths import Paths
from ldpipe.spec import parse_experiment


def _local_project(tmp_path, llm: dict | None):
    rows = [{"prompt": f"\n\nHuman: question number {i}?\n\nAssistant:", "chosen": f" The answer is {i} apples.",
             "rejected": " I do not know.", "split": "train" if i < 8 else "test"} for i in range(10)]
    pl.DataFrame(rows).write_parquet(tmp_path / "pairs.parquet")
    probes = {"n_examples": 4, "selection": "first"}
    if llm:
        probes["llm"] = llm
    spec = parse_experiment({"name": "loc", "dataset": {"kind": "local", "path": str(tmp_path / "pairs.parquet"),
                                                        "columns": {"split": "split"}},
                             "probes": probes}, source="test")
    files = pipeline.files_for(spec, Paths(tmp_path / "home"))
    pipeline.build_dataset(spec, files, log=lambda m: None)
    return spec, files


def test_without_endpoint_llm_types_are_skipped_with_a_clear_reason(tmp_path):
    spec, files = _local_project(tmp_path, None)
    info = pipeline.build_probes(spec, files, log=lambda m: None)
    assert "chosen_gptsemantic" in info.skipped
    assert "needs an LLM endpoint" in info.skipped["chosen_gptsemantic"]
    assert {"chosen", "rejected", "irr_train", "irr_test", "random_permute"} <= set(info.types)


def test_llm_types_built_through_endpoint_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test-secret-123")
    with FakeOpenAI() as srv:
        spec, files = _local_project(tmp_path, {"model": "fake-model", "base_url": srv.base_url,
                                                 "api_key_env": "FAKE_KEY", "concurrency": 2})
        info = pipeline.build_probes(spec, files, log=lambda m: None)
        probes = pl.read_parquet(files.probes)
        llm_rows = probes.filter(pl.col("provenance").str.starts_with("llm:fake-model"))
        assert set(llm_rows["response_type"].unique().to_list()) == set(spec.probes.llm.types)
        assert llm_rows.height == 4 * len(spec.probes.llm.types)
        assert "chosen_gptsemantic" not in info.skipped
        first_calls = srv.n_requests
        assert first_calls > 0
        # a rerun is served from the persistent cache: zero new requests, identical probe set
        pipeline.build_probes(spec, files, log=lambda m: None)
        assert srv.n_requests == first_calls
        assert pl.read_parquet(files.probes).equals(probes)
    for f in (files.paths.home).rglob("*"):
        if f.is_file():
            assert b"sk-test-secret-123" not in f.read_bytes(), f


def test_rerun_builds_no_type_and_adding_a_type_builds_only_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    with FakeOpenAI() as srv:
        llm = {"model": "fake-model", "base_url": srv.base_url, "api_key_env": "FAKE_KEY",
               "types": ["chosen_gptsemantic"]}
        spec, files = _local_project(tmp_path, llm)
        first = pipeline.build_probes(spec, files, log=lambda m: None)
        assert "chosen_gptsemantic" in first.cache.built and first.written
        calls = srv.n_requests
        assert calls == 4    # one rephrase per probe prompt (their chosen texts all differ)
        before = files.probes.read_bytes()
        again = pipeline.build_probes(spec, files, log=lambda m: None)
        # a rerun: zero LLM calls (not even cache look-ups through the client), no type rebuilt, same bytes
        assert srv.n_requests == calls and again.cache.built == [] and not again.written
        assert files.probes.read_bytes() == before
        assert again.llm["chosen_gptsemantic"]["made"] == 4   # its report survives in the cache
        # one more LLM type: only it is built, with one call per prompt; the rest is reused
        spec2, _ = _local_project(tmp_path, {**llm, "types": ["chosen_gptsemantic", "irr_hum"]})
        grown = pipeline.build_probes(spec2, files, log=lambda m: None)
        assert grown.cache.built == ["irr_hum"] and srv.n_requests == calls + 4
        assert "chosen_gptsemantic" in grown.cache.reused and "chosen" in grown.cache.reused
        assert grown.written
