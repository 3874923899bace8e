"""Every influence method on tiny random-init checkpoints of the architectures users bring (tests/tiny_models.py):
GPT-NeoX, Llama, Qwen2 (tied head, grouped KV heads), GPT-2 (learned positions broadcast over the batch, Conv1D
layers, tied head), Mistral (grouped KV heads) and Gemma (a scaled, tied embedding).

The reference is independent of ldpipe's scorer: log pi(y|x) from a plain transformers forward over the token ids
(full logits, log-softmax, the response tokens summed), differentiated with plain torch autograd, one sequence at
a time. exact eNTK must equal its inner products; projected eNTK at a rank no smaller than any layer dimension is
exact on the parameters it covers, and at a small rank ranks the entries as exact does; the naive one-step
validator agrees with the first-order prediction, and A-K-G's per-position predictions sum to it; the same holds
over a LoRA adapter; the heat map's cells are means of the reference eNTK."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

import tiny_models
from ldpipe.influence.akg import akg_factors
from ldpipe.influence.entk import agreement, exact_entk, naive_one_step
from ldpipe.influence.heatmap import heatmap_blocks, heatmap_cells, plot_heatmap
from ldpipe.influence.projected import projected_entk, projection_coverage
from ldpipe.model.scoring import encode_pair
from ldpipe.schema import INFLUENCE_HEATMAP_SCHEMA

torch.set_num_threads(1)

PROMPTS = ["Human: What is the capital of France?\n\nAssistant:", "Human: How do I boil an egg?\n\nAssistant:",
           "The quick brown fox"]
RESPONSES = {"chosen": ["The capital of France is Paris.", "Put the egg in boiling water.", "jumps over the dog."],
             "rejected": ["I am not sure about that.", "It depends on the weather.", "A stitch in time."]}
TRAIN_TEXT = [(PROMPTS[0], RESPONSES["chosen"][0]), (PROMPTS[1], "Thanks for asking!"),
              ("Learning dynamics describe", " how an update changes the model."), (PROMPTS[2], "saves nine.")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


def _load(family: str, root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models.checkpoint(family, root)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _pairs(tok):
    enc = lambda p, r: encode_pair(tok, p, r, max_prompt_tokens=24, max_response_tokens=12)  # noqa: E731
    train = [enc(p, r) for p, r in TRAIN_TEXT]
    probes, labels = [], []
    for k, prompt in enumerate(PROMPTS):
        for typ, resp in RESPONSES.items():
            probes.append(enc(prompt, resp[k]))
            labels.append((f"p{k}", typ))
    return train, probes, labels


def _reference_grads(model, pairs, params) -> torch.Tensor:
    """[N, P] grad of sum_t log pi(y_t | x, y_<t) from model(input_ids).logits, one sequence per backward."""
    rows = []
    for p, r in pairs:
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0, len(p) - 1: -1].double()
        logp = F.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None]).sum()
        grads = torch.autograd.grad(logp, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(q)).reshape(-1).double()
                               for q, g in zip(params, grads)]))
    return torch.stack(rows)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """|a - b| <= rtol * max |b|, entrywise (eNTK entries span orders of magnitude, so one scale for all)."""
    a, b = a.double(), b.double()
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= rtol, f"max error {err:.3g} of the largest entry (allowed {rtol:g})"


def _akg_sums_to_entk(model, update, observed, lr: float, entry: float, scale: float) -> None:
    """A-K-G at every observed position (one JVP, through the eager attention): its sum is lr * K[u, o]."""
    f = akg_factors(model, update, observed, lr=lr)
    assert float(f["predicted"].sum()) == pytest.approx(lr * entry, rel=1e-3, abs=1e-4 * lr * scale)


def _max_dim(model) -> int:
    return max(max(p.shape) for p in model.parameters())


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_every_influence_method_on(family, root):
    model, tok = _load(family, root)
    emb = model.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is emb) == (family in ("gpt2", "qwen2", "gemma"))   # tied heads covered
    train, probes, _ = _pairs(tok)
    named = list(model.named_parameters())    # a tied head appears once, as the input embedding
    G = _reference_grads(model, train + probes, [p for _, p in named])
    ref = G[: len(train)] @ G[len(train):].T

    K = exact_entk(model, train, probes, block=4)
    _close(K, ref, 3e-5)

    # projected at a rank >= every dimension: identity on each side, so exact on the covered parameters
    cov = projection_coverage(model)
    assert cov["share"] > 0.98, cov["skipped"]          # only norms are skipped, in every family
    covered = [n for n, _ in named if n not in set(cov["skipped"])]
    keep = torch.cat([torch.full((p.numel(),), n in covered) for n, p in named])
    ref_cov = G[: len(train), keep] @ G[len(train):, keep].T
    full = projected_entk(model, train, probes, rank=_max_dim(model), batch=3)   # batches that mix lengths
    _close(full, ref_cov, 3e-5)
    # at influence.rank's default (128) the projection is an estimate that varies with its seed: measured on these
    # 24 entries over seeds 0-5, Spearman vs exact 0.83-0.99 (Gemma's seed 0: 0.83), relative error vs
    # exact-on-covered 0.02-0.10; the test takes the median of three seeds
    lows = [projected_entk(model, train, probes, rank=128, seed=s) for s in range(3)]
    assert sorted(agreement(low, ref_cov)["relative_error"] for low in lows)[1] < 0.15
    assert sorted(agreement(low, K)["spearman"] for low in lows)[1] > 0.85

    # the naive one-step validator: a real SGD step agrees with lr * K to first order
    lr = 1e-3 / float(K.abs().max())
    naive = torch.stack([naive_one_step(model, train, probes, lr=lr, i=i) for i in range(2)])
    _close(naive / lr, K[:2], 2e-2)
    _akg_sums_to_entk(model, train[0], probes[1], lr, float(ref[0, 1]), float(K.abs().max()))


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_influence_over_a_lora_adapter_on(family, root):
    from ldpipe.model.lora import apply_lora
    from ldpipe.spec import LoraSpec

    model, tok = _load(family, root)
    model = apply_lora(model, LoraSpec(r=4), tiny_models.checkpoint(family, root))
    with torch.no_grad():   # lora_B starts at zero, which leaves lora_A without gradient: give it weights
        gen = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    train, probes, _ = _pairs(tok)
    adapter = [p for _, p in model.named_parameters() if p.requires_grad]
    assert adapter and sum(p.numel() for p in adapter) < sum(p.numel() for p in model.parameters()) / 4
    G = _reference_grads(model, train + probes, adapter)
    ref = G[: len(train)] @ G[len(train):].T
    K = exact_entk(model, train, probes)
    _close(K, ref, 3e-5)
    assert projection_coverage(model)["share"] == 1.0    # the adapter is nn.Linear layers only
    _close(projected_entk(model, train, probes, rank=max(max(p.shape) for p in adapter)), ref, 3e-5)
    lr = 1e-3 / float(K.abs().max())
    _close(naive_one_step(model, train, probes, lr=lr, i=0) / lr, K[0], 2e-2)
    _akg_sums_to_entk(model, train[0], probes[1], lr, float(ref[0, 1]), float(K.abs().max()))


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_heatmap_on(family, root):
    model, tok = _load(family, root)
    _, probes, labels = _pairs(tok)
    coef = {"p0": 0.05, "p1": 0.04, "p2": 0.03}
    cells = heatmap_cells(model, probes, labels, trained=["chosen", "rejected"], observed=["chosen", "rejected"],
                          dpo_coef=coef)
    G = _reference_grads(model, probes, [p for _, p in model.named_parameters()])
    gram = G @ G.T
    idx = {lab: k for k, lab in enumerate(labels)}
    want = np.mean([float(gram[idx[(e, "rejected")], idx[(e, "chosen")]]) for e in coef])
    got = {(c["trained_type"], c["observed_type"], c["scope"]): c for c in cells}
    assert got[("rejected", "chosen", "same_prompt")]["entk_mean"] == pytest.approx(want, rel=1e-5)
    k = lambda e, t, o: float(gram[idx[(e, t)], idx[(o, "chosen")]])  # noqa: E731  (update e's type t, probe o)
    dpo = np.mean([coef[e] * (k(e, "chosen", o) - k(e, "rejected", o)) for e in coef for o in coef if o != e])
    assert got[("dpo", "chosen", "other_prompt")]["entk_mean"] == pytest.approx(dpo, rel=1e-4, abs=1e-6)
    df = pl.DataFrame([{"run_id": family, "checkpoint": "accumulated", "checkpoint_step": None,
                        **{k: c[k] for k in ("trained_type", "observed_type", "scope", "n")},
                        "entk_mean": None, "value": 1e-3 * c["entk_mean"]} for c in cells],
                      schema=INFLUENCE_HEATMAP_SCHEMA)
    blocks = heatmap_blocks(df)       # the plot's panels: SFT columns and the DPO column, per scope
    assert [(b["scope"], b["kind"]) for b in blocks] == [("same_prompt", "sft"), ("same_prompt", "dpo"),
                                                         ("other_prompt", "sft"), ("other_prompt", "dpo")]
    assert all(np.isfinite(b["matrix"]).all() for b in blocks)
    if family == "gpt2":              # drawing is the same for every family (and the slow part): once
        assert plot_heatmap(df, title=family)[:8] == b"\x89PNG\r\n\x1a\n"
