"""The fast prefix-shared scorer against the naive one-at-a-time reference, and the training helper."""
from __future__ import annotations

import random

import polars as pl
import pytest
import torch

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.models import TinyModelConfig, build_model, train_tokenizer
from ldpipe.schema import PROBE_SCHEMA
from ldpipe.scoring import (
    EncodedProbe,
    batch_logps,
    encode_pair,
    encode_probes,
    score_naive,
    score_probes,
)

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
    assert fast.columns == ["example_id", "response_type", "logp_sum", "n_tokens", "logp_mean", "argmax_logp_sum"]
    assert fast.dtypes == [pl.String, pl.String, pl.Float64, pl.Int64, pl.Float64, pl.Float64]
    assert fast.select("example_id", "response_type").equals(naive.select("example_id", "response_type"))
    assert fast["n_tokens"].to_list() == naive["n_tokens"].to_list()
    assert fast["n_tokens"].to_list() == [len(r) for ep in encoded for r in ep.response_ids]
    for col in ("logp_sum", "argmax_logp_sum", "logp_mean"):
        assert (fast[col] - naive[col]).abs().max() < 1e-4, col
    # The sharpened model tells responses apart by far more than the tolerance.
    assert naive["logp_sum"].std() > 1.0
    assert (fast["logp_mean"] - fast["logp_sum"] / fast["n_tokens"]).abs().max() < 1e-12


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
        assert len(calls) == 1  # every prompt (left-padded) and response in one forward
    for col in ("logp_sum", "argmax_logp_sum"):
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
