"""Cross-example influence: exact eNTK, factored projection and the naive one-step validator,
checked against an independent brute force and against each other on a tiny random GPT-NeoX."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from ldpipe.errors import LdpipeError
from ldpipe.influence.akg import akg_decomposition, akg_factors, naive_optimizer_step
from ldpipe.influence.entk import (
    Update,
    agreement,
    dpo_update,
    exact_entk,
    ipo_update,
    naive_one_step,
    per_sequence_gradients,
    sft_update,
)
from ldpipe.influence.projected import projected_entk, projection_coverage
from ldpipe.model.lm import TinyModelConfig, build_model
from ldpipe.model.scoring import batch_logps

torch.set_num_threads(1)

VOCAB = 300
N_TRAIN = 8


def _pair(rng: random.Random) -> tuple[list[int], list[int]]:
    prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 8))]
    response = [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 7))] + [0]  # EOS is id 0
    return prompt, response


@pytest.fixture(scope="module")
def model():
    return build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0),
                       VOCAB)


@pytest.fixture(scope="module")
def data():
    rng = random.Random(0)
    train = [_pair(rng) for _ in range(N_TRAIN)]
    probes = train + [_pair(rng) for _ in range(16)]  # the training pairs come first
    return train, probes


@pytest.fixture(scope="module")
def K(model, data):
    train, probes = data
    return exact_entk(model, train, probes, block=5)  # a block size that does not divide M


def _covered(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "layernorm" not in n and "layer_norm" not in n]


def _brute_gradients(model, pairs) -> torch.Tensor:
    """Independent reference: full-sequence forward, full log-softmax, .backward() into .grad."""
    rows = []
    for p, r in pairs:
        model.zero_grad(set_to_none=True)
        seq = torch.tensor([p + r])
        logp = F.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)
        logp[len(p) - 1: len(p) - 1 + len(r)].gather(1, seq[0, len(p):, None]).sum().backward()
        rows.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


# --------------------------------------------------------------------------- exact

def test_exact_entk_matches_brute_force_dot_products(model, data, K):
    train, probes = data
    G = _brute_gradients(model, probes)
    ref = G[:N_TRAIN] @ G.T
    assert K.shape == (N_TRAIN, len(probes))
    assert ((K - ref).norm() / ref.norm()).item() < 1e-5
    # self-influence on the diagonal: the squared gradient norm, strictly positive
    diag = K[torch.arange(N_TRAIN), torch.arange(N_TRAIN)]
    assert torch.allclose(diag, (G[:N_TRAIN] ** 2).sum(1), rtol=1e-4)  # fp32 sums of ~1e5 terms
    assert (diag > 0).all()


def test_self_influence_is_the_largest_in_its_row(K):
    wins = sum(int(K[i].argmax()) == i for i in range(N_TRAIN))
    assert wins >= N_TRAIN - 1


def test_per_sequence_gradients_select_parameters(model, data):
    train, _ = data
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    full = per_sequence_gradients(model, train[:2])
    sub = per_sequence_gradients(model, train[:2], params=[name])
    names = [n for n, _ in model.named_parameters()]
    start = sum(p.numel() for n, p in model.named_parameters() if names.index(n) < names.index(name))
    assert sub.shape == (2, 64 * 32)
    assert torch.equal(sub, full[:, start: start + 64 * 32])
    with pytest.raises(LdpipeError, match="unknown parameter"):
        per_sequence_gradients(model, train[:1], params=["nope.weight"])


# --------------------------------------------------------------------------- naive one-step validator

def test_naive_one_step_matches_the_linearisation(model, data, K):
    train, probes = data
    for i in (0, 5):
        small = agreement(naive_one_step(model, train, probes, lr=1e-4, i=i), 1e-4 * K[i])
        assert small["relative_error"] < 0.05, small
        assert small["spearman"] > 0.95, small
        assert small["sign_agreement"] > 0.95, small
        # the remaining error is second order: 10x the step gives a much larger relative error
        big = agreement(naive_one_step(model, train, probes, lr=1e-3, i=i), 1e-3 * K[i])
        assert big["relative_error"] > 3 * small["relative_error"]


def test_naive_one_step_restores_weights_exactly(model, data):
    train, probes = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    delta = naive_one_step(model, train, probes[:4], lr=0.1, i=2)
    assert model.training  # caller's mode restored
    model.eval()
    assert delta.abs().max() > 0  # the step really moved the probes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(LdpipeError, match="outside"):
        naive_one_step(model, train, probes, lr=1e-3, i=N_TRAIN)


def _random_precond(model, seed: int, rank1: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        if rank1 and p.ndim == 2:
            out[n] = torch.outer(0.5 + torch.rand(p.shape[0], generator=g), 0.5 + torch.rand(p.shape[1], generator=g))
        else:
            out[n] = 0.5 + 1.5 * torch.rand(p.shape, generator=g)
    return out


def test_preconditioned_step_matches_preconditioned_entk(model, data):
    train, probes = data
    pc = _random_precond(model, 1)
    Kp = exact_entk(model, train[:2], probes, precond=pc, clip_factor=0.5)
    a = agreement(naive_one_step(model, train[:2], probes, lr=1e-4, i=1, precond=pc, clip_factor=0.5), 1e-4 * Kp[1])
    assert a["relative_error"] < 0.05 and a["spearman"] > 0.95, a
    # the preconditioner changes the kernel (it is not silently ignored)
    assert agreement(exact_entk(model, train[:2], probes), Kp)["relative_error"] > 0.1
    with pytest.raises(LdpipeError, match="precond has no entry"):
        exact_entk(model, train[:1], probes[:1], precond={})


# --------------------------------------------------------------------------- DPO updates

def test_dpo_update_is_the_dpo_loss_gradient(model, data, K):
    train, probes = data
    chosen, rejected = train[0], train[1]
    beta, ref_c, ref_r = 0.5, -40.0, -35.0
    logp, _ = batch_logps(model, [chosen, rejected])
    margin = (logp[0] - ref_c) - (logp[1] - ref_r)
    loss = -F.logsigmoid(beta * margin)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    loss_grad = torch.cat([g.reshape(-1) for g in grads])
    upd = dpo_update(chosen, rejected, beta=beta, margin=margin.item())
    G = per_sequence_gradients(model, [chosen, rejected])
    c = upd.terms[0][1]
    assert ((-loss_grad - c * (G[0] - G[1])).norm() / loss_grad.norm()).item() < 1e-5
    # exact_entk of the DPO update is the same combination of the SFT rows
    Kd = exact_entk(model, [upd], probes)
    assert torch.allclose(Kd[0], c * (K[0] - K[1]), rtol=1e-4, atol=1e-3)
    # and a real step on it follows the linearisation
    lr = 1e-4 / c
    a = agreement(naive_one_step(model, [upd], probes, lr=lr, i=0), lr * Kd[0])
    assert a["relative_error"] < 0.05, a


def test_ipo_update_is_the_ipo_loss_gradient(model, data):
    chosen, rejected = data[0][2], data[0][3]
    beta = 0.1  # target margin 1/(2 beta) = 5 nats
    logp, _ = batch_logps(model, [chosen, rejected])
    margin = logp[0] - logp[1]  # reference log-probs are constants: they shift m, not its gradient
    loss = (margin - 1 / (2 * beta)) ** 2
    loss_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    upd = ipo_update(chosen, rejected, beta=beta, margin=margin.item())
    G = per_sequence_gradients(model, [chosen, rejected])
    d = upd.terms[0][1] * G[0] + upd.terms[1][1] * G[1]
    assert ((-loss_grad - d).norm() / loss_grad.norm()).item() < 1e-5


def test_updates_validate_their_input(model, data):
    with pytest.raises(LdpipeError):
        Update(())
    with pytest.raises(LdpipeError):
        dpo_update(data[0][0], data[0][1], beta=0.0, margin=0.0)
    with pytest.raises(LdpipeError, match="train_pairs\\[0\\]"):
        exact_entk(model, ["not a pair"], data[1][:1])
    assert sft_update(data[0][0], 2.0).terms[0][1] == 2.0


# --------------------------------------------------------------------------- projection

def test_projection_coverage_counts_linear_and_embedding(model):
    cov = projection_coverage(model)
    expected = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
                   for p in m.parameters(recurse=False))
    assert cov["covered"] == expected
    assert cov["total"] == sum(p.numel() for p in model.parameters())
    assert 0.98 < cov["share"] < 1.0
    assert cov["skipped"] and all("layernorm" in n or "layer_norm" in n for n in cov["skipped"])


def test_projection_at_full_rank_is_exact_on_covered_parameters(model, data):
    train, probes = data
    names = _covered(model)
    exact = exact_entk(model, train, probes, params=names)
    proj = projected_entk(model, train, probes, rank=VOCAB, seed=0, batch=5)  # rank >= every dimension
    assert ((proj - exact).norm() / exact.norm()).item() < 1e-5
    # same with a rank-1 (Adafactor-exact) preconditioner on the training side
    pc = _random_precond(model, 2, rank1=True)
    exact_pc = exact_entk(model, train[:3], probes, params=names, precond=pc)
    proj_pc = projected_entk(model, train[:3], probes, rank=VOCAB, precond=pc)
    assert ((proj_pc - exact_pc).norm() / exact_pc.norm()).item() < 1e-5


@pytest.mark.parametrize("name", ["gpt_neox.layers.1.mlp.dense_4h_to_h.weight",  # Linear on [B, T, .]
                                  "gpt_neox.embed_in.weight",                     # Embedding (token gather)
                                  "lm_head.weight"])                              # head on flattened positions
def test_projection_is_unbiased(model, data, name):
    """Averaged over seeds, a rank-4 projection of one matrix converges to the exact kernel of that matrix."""
    train = data[0][:4]
    exact = exact_entk(model, train, train, params=[name])
    mean = sum(projected_entk(model, train, train, rank=4, seed=s, params=[name]) for s in range(100)) / 100
    ratio = mean.diagonal() / exact.diagonal()
    assert 0.85 < ratio.mean().item() < 1.15, ratio  # a wrong 1/sqrt(r) scale would be off by 4x or more
    assert agreement(mean, exact)["relative_error"] < 0.25
    one = agreement(projected_entk(model, train, train, rank=4, seed=0, params=[name]), exact)["relative_error"]
    assert agreement(mean, exact)["relative_error"] < one  # averaging helps: the error is variance, not bias


def test_projection_improves_with_rank(model, data, K):
    train, probes = data
    stats = [agreement(projected_entk(model, train, probes, rank=r, seed=0), K) for r in (2, 8, 32)]
    rho = [s["spearman"] for s in stats]
    err = [s["relative_error"] for s in stats]
    assert rho[0] < rho[1] < rho[2], rho
    assert err[0] > err[1] > err[2], err
    assert rho[2] > 0.9 and err[2] < 0.2, stats[2]


def test_same_seed_same_projection(model, data):
    train, probes = data
    a = projected_entk(model, train[:3], probes[:6], rank=4, seed=7)
    b = projected_entk(model, train[:3], probes[:6], rank=4, seed=7, batch=2)
    c = projected_entk(model, train[:3], probes[:6], rank=4, seed=8)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)  # batching does not change the features
    assert torch.equal(a, projected_entk(model, train[:3], probes[:6], rank=4, seed=7))
    assert not torch.allclose(a, c)


# --------------------------------------------------------------------------- agreement and A·K·G

def test_agreement_known_answers():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    same = agreement(a, a)
    assert same["spearman"] == pytest.approx(1.0) and same["relative_error"] == 0.0
    assert same["sign_agreement"] == 1.0
    rev = agreement(-a, a)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["relative_error"] == pytest.approx(2.0)
    assert rev["sign_agreement"] == 0.0
    # ties get their average rank: ranks (0.5, 0.5, 2) against (0, 1, 2) correlate 1.5 / sqrt(1.5 * 2)
    tie = agreement(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert tie["spearman"] == pytest.approx(1.5 / (1.5 * 2) ** 0.5)
    with pytest.raises(LdpipeError, match="shapes differ"):
        agreement(a, a[:3])


def test_akg_decomposition_reassembles_the_entk(model, data, K):
    train, probes = data
    u, o = 2, N_TRAIN + 3
    obs = probes[o]
    parts = [akg_decomposition(model, train[u], obs, position=t) for t in range(len(obs[1]))]
    total = sum(p["delta_logp_observed"] for p in parts)
    assert total == pytest.approx(float(K[u, o]), rel=1e-3, abs=1e-3)
    p = parts[1]
    assert torch.allclose(p["A"].sum(1), torch.zeros(VOCAB), atol=1e-5)  # log-softmax ignores a shared shift
    assert torch.allclose(p["G"][0].sum(1), torch.zeros(len(train[u][1])), atol=1e-5)  # pi - e_y sums to 0
    full = akg_decomposition(model, train[u], obs, position=1, full_k=True)
    kg = sum(torch.einsum("lvw,lw->v", k, g) for k, g in zip(full["K"], full["G"]))
    assert ((kg - full["KG"]).norm() / full["KG"].norm()).item() < 1e-4
    with pytest.raises(LdpipeError, match="position"):
        akg_decomposition(model, train[u], obs, position=len(obs[1]))


def test_projection_with_tied_input_and_output_embeddings():
    """A tied table gets its gradient from the embedding lookup AND the output head; both add into one block."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, tie_word_embeddings=True, hidden_dropout=0.0, attention_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tied = GPTNeoXForCausalLM(cfg)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    rng = random.Random(1)
    pairs = [([rng.randrange(1, 100) for _ in range(5)], [rng.randrange(1, 100) for _ in range(4)] + [0])
             for _ in range(5)]
    exact = exact_entk(tied, pairs[:2], pairs, params=_covered(tied))
    proj = projected_entk(tied, pairs[:2], pairs, rank=100)
    assert ((proj - exact).norm() / exact.norm()).item() < 1e-5


def test_akg_factors_reassemble_the_entk_and_match_the_decomposition(model, data, K):
    train, probes = data
    u, o = 2, N_TRAIN + 3
    obs = probes[o]
    f = akg_factors(model, train[u], obs, lr=1e-4)
    # summed over positions, the prediction is lr times the exact eNTK entry
    assert float(f["predicted"].sum()) == pytest.approx(1e-4 * float(K[u, o]), rel=1e-3, abs=1e-8)
    # the JVP route gives the same A-weighted KG as the full-Jacobian decomposition
    full = akg_decomposition(model, train[u], obs, position=1, lr=1e-4)
    assert float(f["predicted"][1]) == pytest.approx(full["delta_logp_observed"], rel=1e-3, abs=1e-9)
    assert float(f["kg_token"][1]) == pytest.approx(float(full["KG"][obs[1][1]]), rel=1e-3, abs=1e-6)
    assert ((f["pi_token"] > 0) & (f["pi_token"] < 1)).all() and f["g_norm"] > 0
    # predicted vs realised for a real small SGD step: first order agrees
    assert agreement(f["realised"], f["predicted"])["relative_error"] < 0.05
    # self-influence: SFT on a pair raises its own tokens in total
    own = akg_factors(model, train[u], train[u], lr=1e-4)
    assert float(own["predicted"].sum()) > 0 and float(own["realised"].sum()) > 0


def test_naive_optimizer_step_is_the_real_step(model, data):
    train, probes = data
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(m):
        return -batch_logps(m, [train[1]])[0].sum()

    sgd = lambda ps: torch.optim.SGD(ps, lr=1e-4)  # noqa: E731
    delta, info = naive_optimizer_step(model, loss, probes, optimizer_factory=sgd)
    assert info["clip_factor"] == 1.0 and info["grad_norm"] > 0
    assert torch.allclose(delta, naive_one_step(model, train, probes, lr=1e-4, i=1), rtol=1e-3, atol=1e-6)
    # clipping at half the gradient norm halves the step
    clipped, info2 = naive_optimizer_step(model, loss, probes, optimizer_factory=sgd,
                                          max_grad_norm=info["grad_norm"] / 2)
    assert info2["clip_factor"] == pytest.approx(0.5)
    assert torch.allclose(clipped, naive_one_step(model, train, probes, lr=1e-4, i=1, clip_factor=0.5),
                          rtol=1e-3, atol=1e-6)
    # a fresh Adam's first step is ~lr*sign(g): same direction of travel for the trained pair
    adam, _ = naive_optimizer_step(model, loss, probes, optimizer_factory=lambda ps: torch.optim.Adam(ps, lr=1e-4))
    assert adam[1] > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- optimizer state and preconditioner

def _trained_with(kind: str, data, steps: int = 4, B: int = 4):
    """A tiny float64 model trained a few real steps with `kind`, and the optimizer (its state is the point)."""
    from ldpipe.model.lm import TinyModelConfig as C

    train, _ = data
    m = build_model(C(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1), VOCAB).double()
    m.eval()
    opt = _make(kind, m.parameters(), 1e-3)
    for s in range(steps):
        b = train[(s * B) % len(train):][:B]
        opt.zero_grad()
        (-batch_logps(m, b)[0].sum() / B).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return m, opt


def _make(kind, params, lr):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.RMSprop(params, lr=lr)


def test_optimizer_state_round_trips_and_continues_bit_exactly(data, tmp_path):
    import copy

    from ldpipe.training.optim_state import STATE_FILE, load_into, load_optimizer_state, save_optimizer_state

    train, _ = data
    m, opt = _trained_with("adamw", data, steps=3)
    save_optimizer_state(m, opt, tmp_path)
    raw = torch.load(tmp_path / STATE_FILE, weights_only=True)   # plain tensors and numbers
    st = load_optimizer_state(tmp_path)
    assert raw["step"] == st["step"] == 3 and st["optimizer"] == "adamw" and st["hyper"]["betas"] == [0.9, 0.95]
    names = [n for n, _ in m.named_parameters()]
    assert list(st["state"]) == names
    for n, p in m.named_parameters():
        assert torch.equal(st["state"][n]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    # a copy loaded with the saved state takes exactly the step the original takes
    m2 = copy.deepcopy(m)
    opt2 = load_into(_make("adamw", m2.parameters(), 1e-3), m2, st)
    for mm, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        (-batch_logps(mm, train[:2])[0].sum()).backward()
        o.step()
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    assert load_optimizer_state(tmp_path / "nowhere") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(LdpipeError, match="optimizer state"):
        load_optimizer_state(tmp_path / "bad")


@pytest.mark.parametrize("kind", ["adamw", "rmsprop"])
def test_preconditioned_entk_predicts_a_loaded_optimizer_step(kind, data, tmp_path):
    """Known answer: lr/B * exact_entk(precond=P) is the first-order change after one real step of the optimizer
    loaded with the saved state (its zero-gradient drift subtracted), for a small lr and a small gradient."""
    from ldpipe.influence.akg import optimizer_drift
    from ldpipe.training.optim_state import load_into, load_optimizer_state, preconditioner, save_optimizer_state

    train, probes = data
    probes = probes[:10]
    m, opt = _trained_with(kind, data)
    save_optimizer_state(m, opt, tmp_path)
    st = load_optimizer_state(tmp_path)
    P, why = preconditioner(st, m)
    assert P is not None and str(st["step"]) in why
    lr, B, scale = 1e-4, 4, 3e-2   # scale: the example's gradient small against sqrt(v) (first order in g)
    factory = lambda ps: load_into(_make(kind, ps, lr), m, st)  # noqa: E731
    drift = optimizer_drift(m, probes, optimizer_factory=factory)
    real = torch.stack([naive_optimizer_step(m, lambda mm, i=i: -batch_logps(mm, [train[i]])[0].sum() / B, probes,
                                             optimizer_factory=factory, grad_scale=scale, drift=drift)[0]
                        for i in range(3)])
    pred = lr * scale / B * exact_entk(m, train[:3], probes, precond=P)
    sgd = lr * scale / B * exact_entk(m, train[:3], probes)
    a, b = agreement(pred, real), agreement(sgd, real)
    assert a["relative_error"] < 0.05 and a["spearman"] > 0.95
    assert b["relative_error"] > 5 * a["relative_error"]
    # a fresh optimizer has no first-order preconditioner: the caller falls back to SGD
    fresh = {**st, "step": 0, "state": {}}
    assert preconditioner(fresh, m)[0] is None and "fresh" in preconditioner(fresh, m)[1]


def test_projected_rank1_preconditioner_against_exact(data):
    """projected_precond with a projection of full rank isolates the rank-1 (Adafactor-style) factorisation of P."""
    import tempfile
    from pathlib import Path

    from ldpipe.training.optim_state import load_optimizer_state, preconditioner, save_optimizer_state

    train, probes = data
    m, opt = _trained_with("adamw", data)
    d = Path(tempfile.mkdtemp())
    save_optimizer_state(m, opt, d)
    P, _ = preconditioner(load_optimizer_state(d), m)
    covered = [n for n in P if n in _linear_names(m)]
    Pc = {n: P[n] for n in covered}
    ex = exact_entk(m, train, probes, precond=Pc, params=covered)
    pr = projected_entk(m, train, probes, rank=400, precond=Pc, params=covered)
    a = agreement(pr, ex)
    print(f"rank-1 preconditioner factorisation: {a}")
    assert a["spearman"] > 0.8 and a["sign_agreement"] > 0.8


def _linear_names(m):
    from ldpipe.influence.projected import _covered_names
    return set(_covered_names(m, dict(m.named_parameters())))


def test_heatmap_gives_the_dpo_column_its_own_colour_scale():
    """SFT cells near 1 and DPO cells near 1e-4 (the default run's magnitudes): on one scale the DPO column is
    blank, so it gets a block and a colour limit of its own."""
    import polars as pl

    from ldpipe.influence.heatmap import heatmap_blocks, plot_heatmap
    from ldpipe.schema import INFLUENCE_HEATMAP_SCHEMA

    rows = []
    for scope in ("same_prompt", "other_prompt"):
        for k, trained in enumerate(("chosen", "rejected", "dpo")):
            for j, observed in enumerate(("chosen", "irr_hum", "rejected")):
                v = (1.0 + k + j) * (1e-4 if trained == "dpo" else 1.0) * (-1 if j == 1 else 1)
                rows.append({"run_id": "x.sft", "checkpoint": "accumulated", "checkpoint_step": None,
                             "trained_type": trained, "observed_type": observed, "scope": scope, "entk_mean": None,
                             "value": v, "n": 4})
    df = pl.DataFrame(rows, schema=INFLUENCE_HEATMAP_SCHEMA)
    blocks = heatmap_blocks(df)
    assert [(b["scope"], b["kind"], b["cols"]) for b in blocks] == [
        ("same_prompt", "sft", ["chosen", "rejected"]), ("same_prompt", "dpo", ["dpo"]),
        ("other_prompt", "sft", ["chosen", "rejected"]), ("other_prompt", "dpo", ["dpo"])]
    sft, dpo = blocks[0], blocks[1]
    assert 1.0 <= sft["limit"] <= 4.0 and 1e-4 <= dpo["limit"] <= 5e-4   # each from its own cells
    assert dpo["matrix"][:, 0].tolist() == pytest.approx([3e-4, -4e-4, 5e-4])
    assert plot_heatmap(df, title="t").startswith(b"\x89PNG")
    with pytest.raises(LdpipeError, match="no rows"):
        heatmap_blocks(df, "final")


def test_untouched_coordinates_moved_by_training_directions(model, data):
    """Coordinates an optimizer never updated (v == 0) have no first-order preconditioner: count the ones the
    training directions move. Embedding rows of tokens outside the pairs are never moved."""
    from ldpipe.influence.entk import untouched_moved

    pairs = data[0][:2]
    emb = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is emb)
    used = sorted({t for p, r in pairs for t in p + r})
    unused = [t for t in range(emb.shape[0]) if t not in set(used)][:5]
    mask = torch.zeros_like(emb, dtype=torch.bool)
    mask[unused] = True
    assert untouched_moved(model, pairs, {name: mask}) == 0
    mask[pairs[0][0][0]] = True   # the row of a prompt token the pairs feed: all its coordinates move
    assert untouched_moved(model, pairs, {name: mask}) == emb.shape[1]
    assert untouched_moved(model, pairs, {}) == 0
