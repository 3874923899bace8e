import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing in the test suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A tiny experiment: same code paths as the default, sized to run in seconds on 2 CPU cores.
TINY_YAML = """
name: tiny
dataset:
  kind: synthetic
  synthetic: {seed: 1, n_entities: 16, n_train: 32, n_test: 8, corpus_docs: 200}
probes: {n_examples: 6, selection: random, seed: 0, max_prompt_tokens: 48, max_response_tokens: 40}
model:
  kind: builtin
  vocab_size: 400
  architecture: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}
  pretrain: {steps: 15, batch_size: 8, seq_len: 64, lr: 3.0e-3, warmup: 3}
runs:
  - {name: sft, algo: sft, epochs: 1, batch_size: 8, lr: 2.0e-3, eval_every: 2}
"""


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A project dir with one tiny declaration, the repo's sql/, and its own ldpipe home."""
    proj = tmp_path / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "assets" / "tiny.yaml").write_text(TINY_YAML)
    (proj / "sql").symlink_to(REPO / "sql")
    monkeypatch.setenv("LDPIPE_PROJECT_DIR", str(proj))
    monkeypatch.setenv("LDPIPE_HOME", str(proj / ".ldpipe"))
    monkeypatch.delenv("LDPIPE_ASSETS_DIR", raising=False)
    return proj


@pytest.fixture(scope="module")
def one_thread():
    """LDPIPE_THREADS=1 for a module's training (2 by default; other jobs share the cores), for module-scoped
    fixtures, which cannot use the function-scoped `monkeypatch`."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LDPIPE_THREADS", "1")
    yield
    mp.undo()


def build_inputs(spec, home: Path):
    """Dataset, probe set and base model of `spec` under the ldpipe home `home` (quietly, on CPU)."""
    from ldpipe import pipeline
    from ldpipe.paths import Paths

    files = pipeline.files_for(spec, Paths(home))
    quiet = lambda msg: None  # noqa: E731
    pipeline.build_dataset(spec, files, log=quiet)
    pipeline.build_probes(spec, files, log=quiet)
    pipeline.build_base_model(spec, files, device="cpu", log=quiet)
    return files


@pytest.fixture
def server():
    """A local fake OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py), stopped after the test."""
    from fake_openai import FakeOpenAI

    with FakeOpenAI() as srv:
        yield srv


def wait_until(cond, timeout_s: float, what: str) -> None:
    """Poll `cond()` until it is true; fail naming `what` after `timeout_s` (every wait in a test is bounded)."""
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)
