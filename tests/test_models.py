"""Tokenizer, tiny-model factory, pretraining, checkpoints and loading (local files only, no hub)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from ldpipe.errors import LdpipeError
from ldpipe.model.checkpoints import load_model_and_tokenizer, read_metadata, save_checkpoint
from ldpipe.model.lm import (
    EOS_TOKEN,
    PretrainConfig,
    TinyModelConfig,
    build_model,
    configure_threads,
    count_parameters,
    lm_loss,
    pretrain,
    resolve_device,
    train_tokenizer,
)

torch.set_num_threads(1)

SMALL = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                        max_position_embeddings=128)


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Templated sentences: learnable structure, so a few steps of training must lower the loss."""
    rng = random.Random(seed)
    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
    things = ["apples", "books", "coffee", "music", "rain", "trains", "maths"]
    verbs = ["likes", "hates", "reads about", "talks about", "dreams of"]
    docs = []
    for _ in range(n):
        k = rng.randint(1, 4)
        docs.append(" ".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}." for _ in range(k)))
    return docs


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_corpus() + ["Human: what?\n\nAssistant: Café, naïve, 🎉!"], vocab_size=400)


ROUND_TRIP = [
    "Alice likes apples.",
    "Hello , world . Spaces  before   punctuation !",
    "\n\nHuman: résumé, naïve café, Zürich\n\nAssistant: 日本語 and emoji 🎉🚀",
    " leading space and trailing space ",
    "",
]


def test_tokenizer_round_trip_and_special_ids(tokenizer, tmp_path):
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == 0
    assert 256 < len(tokenizer) <= 400  # bytes + merges learned from the corpus
    for s in ROUND_TRIP:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert 0 not in ids  # no special token sneaks into plain text
        assert tokenizer.decode(ids) == s
    # Learned merges: a frequent word is one token, far fewer tokens than bytes.
    assert len(tokenizer("Alice likes apples.", add_special_tokens=False)["input_ids"]) < 8

    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.eos_token_id == again.pad_token_id == 0
    for s in ROUND_TRIP:
        ids = again(s, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(s, add_special_tokens=False)["input_ids"]
        assert again.decode(ids) == s


def expected_neox_params(d: int, layers: int, inter: int, vocab: int) -> int:
    per_layer = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * inter + inter) + (inter * d + d)
    return 2 * vocab * d + layers * per_layer + 2 * d  # untied in/out embeddings, final LayerNorm


def test_build_model_architecture_and_seeded_init():
    m = build_model(SMALL, vocab_size=400)
    assert count_parameters(m) == expected_neox_params(64, 2, 128, 400)
    assert m.get_input_embeddings().weight.data_ptr() != m.get_output_embeddings().weight.data_ptr()
    assert m.config._attn_implementation == "sdpa"
    assert m.config.hidden_dropout == m.config.attention_dropout == 0.0
    assert m.config.rope_parameters["partial_rotary_factor"] == SMALL.rotary_pct

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    m2 = build_model(SMALL, vocab_size=400)
    assert torch.equal(torch.rand(3), expected_next), "build_model must not consume the caller's RNG"
    s1, s2 = m.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    m3 = build_model(TinyModelConfig(**{**SMALL.__dict__, "seed": 1}), vocab_size=400)
    w = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(m3.state_dict()[w], s1[w])

    with pytest.raises(LdpipeError, match="divisible"):
        build_model(TinyModelConfig(hidden_size=30, num_heads=4), vocab_size=10)


def test_pretrain_lowers_loss(tokenizer):
    corpus = make_corpus(300, seed=1)
    model = build_model(SMALL, len(tokenizer))
    cfg = PretrainConfig(steps=20, batch_size=8, seq_len=32, lr=3e-3, warmup=4, eval_every=5, val_fraction=0.1)
    # Loss of the untrained model on text of the same kind.
    rows = torch.tensor(tokenizer(" ".join(make_corpus(40, seed=9)), add_special_tokens=False)["input_ids"][:320])
    with torch.no_grad():
        before = lm_loss(model.eval(), rows.view(10, 32)).item()
    assert abs(before - math.log(len(tokenizer))) < 0.5  # random init is near uniform

    seen: list[dict] = []
    metrics = pretrain(model, tokenizer, corpus, cfg, progress=seen.append)
    assert [p["step"] for p in seen] == [5, 10, 15, 20]
    assert metrics["steps"] == 20
    assert metrics["tokens_seen"] == 20 * 8 * 32
    assert metrics["val_loss"] < before - 1.5
    assert metrics["train_loss"] < before - 1.5
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert seen[-1]["val_loss"] < seen[0]["val_loss"]
    assert seen[0]["lr"] > seen[-1]["lr"]  # cosine decay after warmup
    assert not model.training
    with torch.no_grad():
        after = lm_loss(model, rows.view(10, 32)).item()
    assert after < before - 1.5


def test_pretrain_fp32_mode_and_bad_input(tokenizer):
    model = build_model(SMALL, len(tokenizer))
    m = pretrain(model, tokenizer, make_corpus(20), PretrainConfig(steps=2, batch_size=2, seq_len=16, warmup=1,
                                                                    eval_every=0, autocast="fp32"))
    assert m["precision"] == "fp32" and math.isfinite(m["val_loss"])
    with pytest.raises(LdpipeError, match="autocast"):
        pretrain(model, tokenizer, make_corpus(20), PretrainConfig(steps=1, autocast="fp16"))
    with pytest.raises(LdpipeError, match="empty"):
        pretrain(model, tokenizer, [], PretrainConfig(steps=1))


def test_save_load_round_trip_identical_logits(tokenizer, tmp_path):
    model = build_model(SMALL, len(tokenizer)).eval()
    path = tmp_path / "models" / "tiny-v1.2"
    out = save_checkpoint(model, tokenizer, path, metadata={"kind": "pretrained", "where": tmp_path})
    assert out == path
    assert read_metadata(path) == {"kind": "pretrained", "where": str(tmp_path)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-v1.2"]  # no temp dir left behind

    loaded, tok = load_model_and_tokenizer(path)
    assert not loaded.training
    ids = torch.tensor([tok("Bob reads about trains. Café 🎉", add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [tokenizer("Bob reads about trains. Café 🎉", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert tok.pad_token_id == tok.eos_token_id == 0

    # Overwriting an existing checkpoint replaces it.
    other = build_model(TinyModelConfig(**{**SMALL.__dict__, "seed": 5}), len(tokenizer))
    save_checkpoint(other, tokenizer, path, metadata={"kind": "second"})
    assert read_metadata(path) == {"kind": "second"}
    again, _ = load_model_and_tokenizer(str(path))
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, again(input_ids=ids).logits)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-v1.2"]


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LdpipeError, match="no-such-model.*does not exist"):
        load_model_and_tokenizer(missing)
    with pytest.raises(LdpipeError, match="does not exist"):
        load_model_and_tokenizer(str(missing))
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(LdpipeError, match="empty-dir.*holds no model"):
        load_model_and_tokenizer(empty)
    # A hub-style id that is not in the local cache: no download, a clear error.
    with pytest.raises(LdpipeError, match="ldpipe-tests/not-a-cached-model.*Hugging Face cache.*local_files_only=False"):
        load_model_and_tokenizer("ldpipe-tests/not-a-cached-model")


def test_resolve_device_and_threads():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LdpipeError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LdpipeError, match="CUDA is not available"):
            resolve_device("cuda:0")
    try:
        assert configure_threads(1) == 1
        with pytest.raises(LdpipeError):
            configure_threads(0)
    finally:
        torch.set_num_threads(1)


def test_threads_from_the_environment(monkeypatch):
    try:
        monkeypatch.setenv("LDPIPE_THREADS", "1")
        assert configure_threads() == 1
        monkeypatch.setenv("LDPIPE_THREADS", "two")
        with pytest.raises(LdpipeError, match="LDPIPE_THREADS"):
            configure_threads()
        assert configure_threads(1) == 1          # an explicit count wins over the environment
    finally:
        torch.set_num_threads(1)


def test_attention_without_cudnn_only_changes_cuda():
    import torch

    from ldpipe.model.lm import attention_without_cudnn

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_without_cudnn("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    # the backend switches are global flags, so this holds on a CPU-only build too
    with attention_without_cudnn("cuda"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


_DISK_FULL_SCRIPT = """
import sys
from pathlib import Path
from ldpipe.errors import LdpipeError
from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer
from ldpipe.model.checkpoints import save_checkpoint

root = Path(sys.argv[1])
tok = train_tokenizer([f"word{i} and more text {i % 5}" for i in range(50)], vocab_size=300)
model = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tok))
try:
    save_checkpoint(model, tok, root / "runs" / "final")
    print("SAVED")
except LdpipeError as e:
    print("ERROR", e)
print("LEFT", sorted(p.name for p in (root / "runs").iterdir()))
"""


def test_a_full_disk_leaves_no_temp_checkpoint_and_says_so(tmp_path):
    """A real full disk: a 64 KiB tmpfs in a private mount namespace (unshare -rm), smaller than the checkpoint."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a tiny filesystem without root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c",
                        'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3" "$1"', "sh",
                        str(mnt), sys.executable, _DISK_FULL_SCRIPT], capture_output=True, text=True, timeout=300)
    if "mount" in r.stderr and r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    assert f"ERROR no space left on {mnt / 'runs'}" in r.stdout, r.stdout
    assert "LEFT []" in r.stdout                  # no final.tmp-* behind


def test_a_dead_writers_temp_checkpoint_is_swept_by_the_next_save(tokenizer, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()
    runs = tmp_path / "runs"
    (runs / f"final.tmp-{dead}").mkdir(parents=True)
    (runs / f"final.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    (runs / "final.tmp-1").mkdir()                # PID 1 is alive: not ours to remove
    model = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        len(tokenizer))
    save_checkpoint(model, tokenizer, runs / "final")
    assert sorted(p.name for p in runs.iterdir()) == ["final", "final.tmp-1"]
