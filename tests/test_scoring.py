"""The fast prefix-shared scorer against the naive one-at-a-time reference, and the training helper."""
from __future__ import annotations

import logging
import math
import random

import polars as pl
import pytest
import torch

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer
from ldpipe.model.scoring import (
    METRIC_SCHEMA,
    SCORE_SCHEMA,
    EncodedProbe,
    batch_logps,
    encode_pair,
    encode_probes,
    score_naive,
    score_probes,
)
from ldpipe.schema import PROBE_SCHEMA

torch.set_num_threads(1)

MAX_PROMPT, MAX_RESP = 24, 12
WORDS = ("the a of to and model learns data token answer question human assistant why how "
         "because rain sun river stone cat dog blue green quickly slowly").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return train_tokenizer([sentence(rng, rng.randint(3, 40)) for _ in range(300)], vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer):
    m = build_model(TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                    max_position_embeddings=64), len(tokenizer))
    # Sharpen the random init: near-uniform logits would let an off-by-one position or a mask leak
    # change the sums by less than the tolerance.
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(6.0)
    return m.eval()


@pytest.fixture(scope="module")
def probes() -> pl.DataFrame:
    """Mixed prompt lengths (short to truncated), mixed response lengths, one empty response."""
    rng = random.Random(1)
    rows = []
    for e, n_prompt in enumerate([2, 5, 9, 14, 30, 45, 3, 20]):
        prompt = f"\n\nHuman: {sentence(rng, n_prompt)}?\n\nAssistant:"
        for t, n_resp in enumerate([1, 4, 8, 25, 0]):
            resp = "" if n_resp == 0 else " " + sentence(rng, n_resp)
            rows.append({"example_id": f"ex{e}", "response_type": f"type{t}", "prompt": prompt,
                         "response": resp, "provenance": "test"})
    rng.shuffle(rows)  # rows of one example need not be adjacent
    return pl.DataFrame(rows, schema=PROBE_SCHEMA)


@pytest.fixture(scope="module")
def encoded(tokenizer, probes):
    return encode_probes(tokenizer, probes, max_prompt_tokens=MAX_PROMPT, max_response_tokens=MAX_RESP)


@pytest.fixture(scope="module")
def naive(model, encoded):
    return score_naive(model, encoded)


def test_encoding_truncates_prompt_end_and_response_start(tokenizer, probes, encoded):
    eos = tokenizer.eos_token_id
    order = list(dict.fromkeys(probes["example_id"].to_list()))
    assert [ep.example_id for ep in encoded] == order  # first-seen order
    by_id = {ep.example_id: ep for ep in encoded}
    n_cut_prompts = n_cut_resps = 0
    for row in probes.iter_rows(named=True):
        ep = by_id[row["example_id"]]
        full_p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        full_r = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert ep.prompt_ids == full_p[-MAX_PROMPT:]
        k = ep.response_types.index(row["response_type"])
        r = ep.response_ids[k]
        assert r[-1] == eos and len(r) <= MAX_RESP
        assert r[:-1] == full_r[: MAX_RESP - 1]
        n_cut_prompts += len(full_p) > MAX_PROMPT
        n_cut_resps += len(full_r) > MAX_RESP - 1
        if row["response"] == "":
            assert r == [eos]
    assert n_cut_prompts > 0 and n_cut_resps > 0, "the fixture must exercise truncation"
    # The kept prompt end is the "Assistant:" turn, the dropped part is the start.
    long_ep = max(encoded, key=lambda ep: len(ep.prompt_ids))
    assert tokenizer.decode(long_ep.prompt_ids).endswith("?\n\nAssistant:")

    p, r = encode_pair(tokenizer, "Human: why\n\nAssistant:", " because rain", max_prompt_tokens=3,
                       max_response_tokens=2)
    full_p = tokenizer("Human: why\n\nAssistant:", add_special_tokens=False)["input_ids"]
    full_r = tokenizer(" because rain", add_special_tokens=False)["input_ids"]
    assert p == full_p[-3:] and r == [full_r[0], eos]


def test_fast_scorer_matches_naive(model, encoded, naive):
    fast = score_probes(model, encoded)
    assert fast.columns == ["example_id", "response_type", "logp_sum", "n_tokens", "logp_mean", "argmax_logp_sum",
                            "A_o", "p_e", "energy", "except_argmax", "argmax_match"]
    assert fast.schema == naive.schema == pl.Schema(SCORE_SCHEMA)
    assert fast.dtypes == [pl.String, pl.String, pl.Float64, pl.Int64, pl.Float64] + [pl.Float64] * 5 + [pl.Int64]
    assert fast.select("example_id", "response_type").equals(naive.select("example_id", "response_type"))
    assert fast["n_tokens"].to_list() == naive["n_tokens"].to_list()
    assert fast["n_tokens"].to_list() == [len(r) for ep in encoded for r in ep.response_ids]
    for col in ("logp_sum", "argmax_logp_sum", "logp_mean", *METRIC_SCHEMA):
        assert (fast[col] - naive[col]).abs().max() < 1e-4, col
        assert fast[col].is_finite().all() and naive[col].is_finite().all(), col
    for col in ("p_e", "energy", "except_argmax"):
        assert fast[col].std() > 1e-3, f"{col} must vary across responses for the comparison to mean anything"
    # The sharpened model tells responses apart by far more than the tolerance.
    assert naive["logp_sum"].std() > 1.0
    assert (fast["logp_mean"] - fast["logp_sum"] / fast["n_tokens"]).abs().max() < 1e-12


def test_flat_distributions_match_naive(tokenizer, encoded):
    """Near-uniform predictions (an untrained model, weights scaled down): log Z must not be derived
    from 1 - (non-argmax mass), which cancels when that mass is close to 1."""
    flat = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                       max_position_embeddings=64), len(tokenizer))
    with torch.no_grad():
        flat.get_output_embeddings().weight.mul_(0.1)
    fast, naive = score_probes(flat, encoded), score_naive(flat, encoded)
    assert (fast["argmax_logp_sum"] - fast["logp_sum"]).max() < 1.0, "the fixture must be near-uniform"
    for col in ("logp_sum", "argmax_logp_sum", *METRIC_SCHEMA):
        assert (fast[col] - naive[col]).abs().max() < 1e-4, col


def test_argmax_bounds_logp(model, encoded):
    fast = score_probes(model, encoded)
    assert (fast["argmax_logp_sum"] >= fast["logp_sum"] - 1e-9).all()
    assert (fast["argmax_logp_sum"] <= 0).all()
    assert (fast["argmax_logp_sum"] > fast["logp_sum"] + 1e-3).any()


@pytest.mark.parametrize("max_batch_tokens", [1, 90, 1_000_000])
def test_batching_does_not_change_scores(model, encoded, naive, max_batch_tokens):
    calls: list[tuple[int, int]] = []
    model.train()
    fast = score_probes(model, encoded, max_batch_tokens=max_batch_tokens, progress=lambda d, t: calls.append((d, t)))
    assert model.training, "score_probes must restore the caller's train/eval mode"
    model.eval()
    total = len(naive)
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    if max_batch_tokens == 1:
        assert len(calls) == total  # one response per forward
    if max_batch_tokens == 1_000_000:
        assert len(calls) < total / 4  # one prompt forward, a few length buckets
    for col in ("logp_sum", "argmax_logp_sum", *METRIC_SCHEMA):
        assert (fast[col] - naive[col]).abs().max() < 1e-4


def test_batch_logps_matches_naive_with_gradients(model, encoded, naive):
    pairs = [(ep.prompt_ids, r) for ep in encoded for r in ep.response_ids]
    model.zero_grad()
    logp, n = batch_logps(model, pairs)
    assert logp.dtype == torch.float32 and logp.shape == (len(pairs),)
    assert n.tolist() == naive["n_tokens"].to_list()
    assert (logp.detach().double() - torch.tensor(naive["logp_sum"].to_list())).abs().max() < 1e-4
    (-logp.sum()).backward()
    for name in ("gpt_neox.embed_in.weight", "embed_out.weight", "lm_head.weight",
                 "gpt_neox.layers.0.attention.query_key_value.weight"):
        p = dict(model.named_parameters()).get(name)
        if p is not None:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()

    # Right padding needs no attention mask: a pair scores the same alone and next to a longer one.
    short, long_ = pairs[0], max(pairs, key=lambda pr: len(pr[0]) + len(pr[1]))
    alone, _ = batch_logps(model, [short])
    together, _ = batch_logps(model, [short, long_])
    assert abs(alone.item() - together[0].item()) < 1e-4


def test_bounds_and_bad_input(model, tokenizer, probes):
    too_long = EncodedProbe("long-one", list(range(1, 60)), ["chosen"], [[5] * 10 + [0]])
    with pytest.raises(LdpipeError, match="long-one.*64"):
        score_probes(model, [too_long])
    with pytest.raises(LdpipeError, match="long-one"):
        score_naive(model, [too_long])
    bad_vocab = EncodedProbe("ex-vocab", [1, 2], ["chosen"], [[10_000, 0]])
    with pytest.raises(LdpipeError, match="ex-vocab.*vocabulary"):
        score_probes(model, [bad_vocab])

    with pytest.raises(DataValidationError, match=r"probes, row 3, field 'response'"):
        encode_probes(tokenizer, probes.with_columns(
            pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("response")).alias("response")))
    with pytest.raises(DataValidationError, match="missing column"):
        encode_probes(tokenizer, probes.drop("prompt"))
    dup = pl.concat([probes, probes.head(1)])
    with pytest.raises(DataValidationError, match="duplicate response_type"):
        encode_probes(tokenizer, dup)
    changed = probes.with_columns(
        pl.when(pl.int_range(pl.len()) == len(probes) - 1).then(pl.lit("other prompt"))
        .otherwise(pl.col("prompt")).alias("prompt"))
    with pytest.raises(DataValidationError, match="different prompt"):
        encode_probes(tokenizer, changed)


# --------------------------------------------------------------------------- per-sequence metrics

def _brute_metrics(logit_rows: list[list[float]], labels: list[int]) -> dict[str, float]:
    """The metric formulas (docs/glossary.md#metrics) by brute force in Python float64, straight from the definitions."""
    V = len(logit_rows[0])
    norms, pes, energies, except_, match = [], [], [], 0.0, 0
    for row, y in zip(logit_rows, labels):
        m = max(row)
        w = [math.exp(x - m) for x in row]
        z = math.fsum(w)
        pi = [x / z for x in w]
        top = max(range(V), key=lambda v: pi[v])
        norms.append(math.sqrt(math.fsum(p * p for p in pi)))
        pes.append(math.sqrt(math.fsum((p - (v == y)) ** 2 for v, p in enumerate(pi))))
        energies.append(1.0 - pi[y])
        except_ += math.log(math.fsum(w[v] for v in range(V) if v != top) / z)  # log(1 - max pi), no cancellation
        match += top == y   # ties: the first maximal token is the argmax, as torch.argmax
    n = len(labels)
    return {"A_o": math.sqrt(V * (sum(norms) / n) ** 2 + V - 2), "p_e": sum(pes) / n,
            "energy": sum(energies) / n, "except_argmax": except_, "argmax_match": match}


def test_token_stats_hand_computed_and_stable_at_max_prob_one():
    from ldpipe.model.scoring import _reduce_stats, _token_stats

    rows = [[2.0, 1.0, 0.5, -1.0],   # generic
            [0.0, 0.0, 0.0, 0.0],    # uniform, a four-way tie for the argmax
            [5.0, 5.0, 1.0, 0.0],    # two-way tie, label on the second
            [40.0, 0.0, 0.0, 0.0],   # max pi = 1 - 6e-18: 1 - max pi is 0 in fp32 and fp64
            [300.0, 0.0, 0.0, 0.0]]  # exp underflows for every other token
    labels = [1, 3, 1, 0, 1]
    head = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4))
    stats = _token_stats(head, torch.tensor(rows), torch.tensor(labels))
    assert torch.isfinite(stats).all()
    # The reference's log(1 - max pi) breaks on the last two rows: the naive form is -inf there.
    assert torch.isinf(torch.log1p(-stats[3:, 1].exp())).all()
    for i, (row, y) in enumerate(zip(rows, labels)):
        b = _brute_metrics([row], [y])
        lse = max(row) + math.log(math.fsum(math.exp(x - max(row)) for x in row))
        assert stats[i, 0].item() == pytest.approx(row[y] - lse, abs=1e-5)
        assert stats[i, 1].item() == pytest.approx(max(row) - lse, abs=1e-5)
        assert stats[i, 3].item() == pytest.approx(b["p_e"], abs=1e-6)
        assert stats[i, 4].item() == pytest.approx(b["energy"], abs=1e-6)
        assert stats[i, 5].item() == pytest.approx(b["except_argmax"], rel=1e-5, abs=1e-5)
        assert stats[i, 6].item() == b["argmax_match"]
    # the label is the argmax only where it holds the (first) maximal logit: row 3
    assert stats[:, 6].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert stats[3, 5].item() == pytest.approx(math.log(3) - 40, rel=1e-6)
    assert stats[4, 5].item() == pytest.approx(math.log(3) - 300, rel=1e-6)
    assert stats[4, 3].item() == pytest.approx(math.sqrt(2), abs=1e-6)  # pi = e_0, label 1
    sums = _reduce_stats(stats, torch.tensor([0, 0, 1, 1, 1]), 2)
    assert sums.dtype == torch.float64 and sums[1, 5].item() == pytest.approx(
        sum(_brute_metrics([r], [y])["except_argmax"] for r, y in zip(rows[2:], labels[2:])), rel=1e-6)


def test_metrics_match_brute_force_per_sequence(model, encoded):
    few = encoded[:2]
    fast = score_probes(model, few)
    k = 0
    with torch.no_grad():
        for ep in few:
            P = len(ep.prompt_ids)
            for r in ep.response_ids:
                logits = model(input_ids=torch.tensor([ep.prompt_ids + r])).logits[0].double()
                b = _brute_metrics(logits[P - 1: P - 1 + len(r)].tolist(), r)
                row = fast.row(k, named=True)
                for col, want in b.items():
                    assert row[col] == pytest.approx(want, rel=1e-5, abs=1e-5), (ep.example_id, col)
                k += 1
    assert k == len(fast)
    V = model.get_output_embeddings().out_features
    # ||pi|| lies in [1/sqrt(V), 1], so A_o lies in [sqrt(V - 1), sqrt(2V - 2)].
    assert fast["A_o"].min() >= math.sqrt(V - 1) - 1e-6 and fast["A_o"].max() <= math.sqrt(2 * V - 2) + 1e-6
    assert (fast["energy"].is_between(0, 1)).all() and (fast["except_argmax"] <= 0).all()


def test_no_nan_when_the_model_is_certain(model, encoded):
    """A head scaled far up puts max pi at 1.0 in fp32 at many positions; every metric stays finite."""
    import copy

    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.get_output_embeddings().weight.mul_(40.0)
    ep = encoded[0]
    P = len(ep.prompt_ids)
    r = max(ep.response_ids, key=len)
    with torch.no_grad():
        logits = sharp(input_ids=torch.tensor([ep.prompt_ids + r])).logits[0].float()
    lmax = torch.log_softmax(logits, dim=-1)[P - 1:].max(-1).values
    assert torch.isinf(torch.log1p(-lmax.exp())).any(), "the fixture must reach max pi == 1.0 in fp32"
    fast, naive = score_probes(sharp, encoded), score_naive(sharp, encoded)
    for col in SCORE_SCHEMA:
        if fast.schema[col] == pl.Float64:
            assert fast[col].is_finite().all() and naive[col].is_finite().all(), col
    for col in METRIC_SCHEMA:
        rel = ((fast[col] - naive[col]).abs() / (1.0 + naive[col].abs())).max()
        assert rel < 1e-4, col


# --------------------------------------------------------------------------- out-of-memory back-off

def _fail_above(model, max_tokens: int | None, exc_factory):
    """Fault injection on the real model: its transformer raises an OOM when a forward holds more
    than max_tokens input tokens (always, if None). Returns the hook handle and the sizes it saw."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.numel())
        if max_tokens is None or ids.numel() > max_tokens:
            raise exc_factory()

    return model.base_model.register_forward_pre_hook(hook, with_kwargs=True), seen


@pytest.mark.parametrize("exc_factory", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
    lambda: RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)"),
], ids=["cuda", "cpu", "message"])
def test_out_of_memory_halves_the_batch_and_retries(model, encoded, naive, caplog, exc_factory):
    unfaulted = score_probes(model, encoded, max_batch_tokens=4096)
    handle, seen = _fail_above(model, 40, exc_factory)
    try:
        with caplog.at_level(logging.WARNING, logger="ldpipe.model.scoring"):
            calls: list[tuple[int, int]] = []
            faulted = score_probes(model, encoded, max_batch_tokens=4096, progress=lambda d, t: calls.append((d, t)))
    finally:
        handle.remove()
    assert max(seen) > 40, "the first batch must have been too big"
    assert calls[-1] == (len(naive), len(naive))
    assert faulted.select("example_id", "response_type").equals(unfaulted.select("example_id", "response_type"))
    for col in ("logp_sum", "argmax_logp_sum", *METRIC_SCHEMA):
        assert (faulted[col] - unfaulted[col]).abs().max() < 1e-4, col
        assert (faulted[col] - naive[col]).abs().max() < 1e-4, col
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("out of memory" in w and "max_batch_tokens" in w for w in warnings)
    assert "max_batch_tokens in force: 4096" in warnings[0]
    assert len(warnings) >= 2, "4096 -> ... must take several halvings to get under 40 tokens"


def test_out_of_memory_at_one_response_is_a_clear_error(model, encoded):
    handle, seen = _fail_above(model, None, lambda: torch.OutOfMemoryError("CUDA out of memory"))
    try:
        with pytest.raises(LdpipeError, match=r"out of memory.*one response per forward.*example '.+'.*"
                                              r"max_batch_tokens in force: \d+, started at 512.*"
                                              r"probes\.max_prompt_tokens") as info:
            score_probes(model, encoded, max_batch_tokens=512)
    finally:
        handle.remove()
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert len(seen) < 20, "halving must stop once a forward holds one prompt or one response"

    # Errors other than out-of-memory are not retried.
    handle, seen = _fail_above(model, None, lambda: RuntimeError("shape mismatch"))
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            score_probes(model, encoded)
    finally:
        handle.remove()
    assert len(seen) == 1
