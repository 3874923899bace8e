"""The paper's one-step decomposition Delta log pi = -eta A K G at observed positions (akg_decomposition: exact, tiny
models; akg_factors: summaries from one Jacobian-vector product, any size), and the validator with the run's real
optimizer (naive_optimizer_step, optimizer_drift)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn

from ldpipe.errors import LdpipeError
from ldpipe.influence.entk import (
    Pair,
    Update,
    _as_updates,
    _check_pairs,
    _directions,
    _logp_change,
    _select,
    _weights_restored,
)
from ldpipe.model.lm import eval_mode

# --------------------------------------------------------------------------- A·K·G at one position

def _response_logits(model: nn.Module, pair: Pair) -> torch.Tensor:
    """[len(response), V] fp32 logits that predict each response token (position t predicts token t+1)."""
    p, r = pair
    seq = torch.tensor([list(p) + list(r)], device=next(model.parameters()).device)
    return model(input_ids=seq, use_cache=False).logits[0, len(p) - 1: len(p) - 1 + len(r)].float()


def _jacobian(z: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """[V, P] d z / d theta for a logit vector z, via one batched vector-Jacobian product."""
    eye = torch.eye(z.numel(), device=z.device, dtype=z.dtype)
    grads = torch.autograd.grad(z, tensors, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros(z.numel(), *t.shape, device=z.device)).reshape(z.numel(), -1)
                      .float() for t, g in zip(tensors, grads)], dim=1)


def akg_decomposition(model: nn.Module, update: Union[Pair, Update], observed: Pair, *, position: int,
                      lr: float = 1.0, full_k: bool = False, params: Sequence[str] | None = None) -> dict:
    """The paper's one-step decomposition at one observed position (docs/glossary.md#akg):

        Delta log pi(. | x_o, y_o[:t]) = -lr * A · sum_k sum_l K_k[l] G_k[l]  + O(lr^2)

    - pi [V]: the observed next-token distribution; A [V, V] = I - 1 pi^T (Jacobian of log-softmax);
    - G: per update term k, [L_k, V] = c_k * (pi_u[l] - e_{y_u[l]}) (SFT residual scaled by the term's
      coefficient: DPO's G+ and -G-);
    - KG [V] = sum_k sum_l K_k[l] G_k[l], computed as -J_o d (J_o: [V, P] Jacobian of the observed
      logits, d: the update direction), so the V x V kernels are never needed for it;
    - K (only with full_k): per term [L_k, V, V] blocks J_o J_u[l]^T, the eNTK itself;
    - delta_logits = -lr * KG, delta_logp = A delta_logits, and delta_logp_observed at the observed
      token y_o[position]. Summed over positions, delta_logp_observed equals lr * exact_entk[u, o].

    Memory is V x P floats for J_o (and per update position with full_k): a tiny-model diagnostic.
    """
    updates = _as_updates([update])
    _check_pairs([observed], "observed")
    if not 0 <= position < len(observed[1]):
        raise LdpipeError(f"akg_decomposition: position {position} outside the observed response "
                          f"(0..{len(observed[1]) - 1})")
    selected = _select(model, params)
    tensors = [p for _, p in selected]
    d = _directions(model, updates, params, None, 1.0)[0]
    with eval_mode(model):
        z_o = _response_logits(model, observed)[position]
        j_o = _jacobian(z_o, tensors)
        pi = torch.softmax(z_o.detach(), dim=-1)
        V = pi.numel()
        A = torch.eye(V, device=pi.device) - pi[None, :].expand(V, V)  # row k: e_k - pi
        kg = -(j_o @ d)
        G, K = [], []
        for pair, c in updates[0].terms:
            z_u = _response_logits(model, pair)
            onehot = torch.nn.functional.one_hot(torch.tensor(pair[1], device=z_u.device), V).float()
            G.append(c * (torch.softmax(z_u.detach(), dim=-1) - onehot))
            if full_k:
                K.append(torch.stack([j_o @ _jacobian(z_u[l], tensors).T for l in range(z_u.size(0))]))
    delta_logits = -float(lr) * kg
    delta_logp = A @ delta_logits
    y = int(observed[1][position])
    out = {"pi": pi.cpu(), "A": A.cpu(), "G": [g.cpu() for g in G], "KG": kg.cpu(),
           "delta_logits": delta_logits.cpu(), "delta_logp": delta_logp.cpu(), "observed_token": y,
           "delta_logp_observed": float(delta_logp[y])}
    if full_k:
        out["K"] = [k.cpu() for k in K]
    return out


# --------------------------------------------------------------------------- real optimizer step, A·K·G at scale

def naive_optimizer_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], probe_pairs: Sequence[Pair],
                         *, optimizer_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                         max_grad_norm: float | None = None, grad_scale: float = 1.0,
                         drift: torch.Tensor | None = None, params: Sequence[str] | None = None
                         ) -> tuple[torch.Tensor, dict]:
    """[M] Delta log pi of every probe after ONE real optimizer step on `loss_fn(model)`; weights restored.

    The step is what training does: backward, clip_grad_norm_(max_grad_norm), the gradient times
    `grad_scale` (e.g. the run's recorded clip factor of the whole batch), optimizer.step() with the
    optimizer from `optimizer_factory` (called once per step: a fresh one, or one loaded with a
    checkpoint's state, see ldpipe.training.optim_state.load_into). A loaded Adam moves the weights even for a zero
    gradient (momentum drift); pass `drift` (from `optimizer_drift`) to subtract that part, leaving the
    example's own effect. Parameters without a gradient get a zero one, so drift and step cover the same
    parameters. Returns (delta, {"grad_norm", "clip_factor"}).
    """
    _check_pairs(probe_pairs, "probe_pairs")
    tensors = [p for _, p in _select(model, params)]
    max_norm = float(max_grad_norm) if max_grad_norm is not None else float("inf")
    norms: list[float] = []

    def step() -> None:
        for p in tensors:
            p.grad = None
        loss = loss_fn(model)
        if loss.dim() != 0:
            raise LdpipeError(f"naive_optimizer_step: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        for p in tensors:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(float(torch.nn.utils.clip_grad_norm_(tensors, max_norm)))
        if grad_scale != 1.0:
            for p in tensors:
                p.grad.mul_(float(grad_scale))
        optimizer_factory(tensors).step()

    delta = _logp_change(model, tensors, probe_pairs, step)
    norm = norms[0]
    clip = min(1.0, max_norm / norm) if norm > 0 else 1.0
    if drift is not None:
        delta = delta - drift.double().to(delta.device)
    return delta.float().cpu(), {"grad_norm": norm, "clip_factor": clip}


def optimizer_drift(model: nn.Module, probe_pairs: Sequence[Pair], *,
                    optimizer_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                    params: Sequence[str] | None = None) -> torch.Tensor:
    """[M] fp64 Delta log pi of every probe after one optimizer step on an all-zero gradient; weights restored.

    What a loaded optimizer does regardless of the example (Adam's b1*m momentum, decoupled weight decay):
    `naive_optimizer_step(..., drift=...)` subtracts it. Zero for a fresh Adam/RMSprop without weight decay.
    """
    _check_pairs(probe_pairs, "probe_pairs")
    tensors = [p for _, p in _select(model, params)]

    def step() -> None:
        for p in tensors:
            p.grad = torch.zeros_like(p)
        optimizer_factory(tensors).step()

    return _logp_change(model, tensors, probe_pairs, step).cpu()


def position_logps(model: nn.Module, pair: Pair) -> torch.Tensor:
    """[len(response)] fp32 log pi of each response token (no gradient)."""
    _check_pairs([pair], "pair")
    with torch.no_grad(), eval_mode(model):
        z = _response_logits(model, pair)
        y = torch.tensor(pair[1], device=z.device)
        return torch.log_softmax(z, dim=-1).gather(1, y[:, None]).squeeze(1).cpu()


@contextmanager
def _eager_attention(model: nn.Module):
    """HF models' fused SDPA attention has no double backward; the eager path (same math) does."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    if old is None or old == "eager":
        yield
        return
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = old


def akg_factors(model: nn.Module, update: Union[Pair, Update], observed: Pair, *, lr: float,
                params: Sequence[str] | None = None) -> dict:
    """A·K·G summaries at EVERY observed position, from one Jacobian-vector product (no V x P Jacobian).

    With d the update direction (sum_k c_k grad log pi(pair_k)) and J_o the Jacobian of the observed
    logits, the eNTK term is KG = sum_k sum_l K_k[l] G_k[l] = -J_o d, so one JVP gives it at all
    positions. Per observed position t (token y_t), as [L] tensors:
      pi_token = pi(y_t); kg_token = KG[y_t]; kg_expect = pi . KG (the A = I - 1 pi^T correction);
      kg_norm = ||KG||; predicted = -lr * (kg_token - kg_expect)  (= [A (-lr KG)]_{y_t});
      realised = the change of log pi(y_t) after the real SGD step theta += lr * d (weights restored).
    g_norm: the Frobenius norm of all G_k = c_k (pi_u - e_{y_u}) (how far the update's own predictions
    are from its targets). predicted.sum() equals lr * exact_entk[update, observed].
    """
    updates = _as_updates([update])
    _check_pairs([observed], "observed")
    selected = _select(model, params)
    tensors = [p for _, p in selected]
    d = _directions(model, updates, params, None, 1.0)[0]
    d_parts = list(torch.split(d, [p.numel() for p in tensors]))
    y = torch.tensor(observed[1], device=d.device)
    with eval_mode(model), _eager_attention(model):
        z = _response_logits(model, observed)
        # J d by double backward: v -> J^T v is linear in v, so d/dv <J^T v, d> = J d.
        v = torch.zeros_like(z, requires_grad=True)
        jt_v = torch.autograd.grad(z, tensors, grad_outputs=v, create_graph=True, allow_unused=True)
        dot = sum((g.float() * dp.view_as(g)).sum() for g, dp in zip(jt_v, d_parts) if g is not None)
        jd = torch.autograd.grad(dot, v)[0].detach()
        pi = torch.softmax(z.detach(), dim=-1)
        g_sq = 0.0
        for pair, c in updates[0].terms:
            with torch.no_grad():
                z_u = _response_logits(model, pair)
            onehot = torch.nn.functional.one_hot(torch.tensor(pair[1], device=z_u.device), z_u.size(1)).float()
            g_sq += float(((c * (torch.softmax(z_u, dim=-1) - onehot)) ** 2).sum())
    kg = -jd
    kg_token = kg.gather(1, y[:, None]).squeeze(1)
    kg_expect = (pi * kg).sum(1)
    before = position_logps(model, observed)
    with _weights_restored(model, tensors):
        with torch.no_grad():
            for p, dp in zip(tensors, d_parts):
                p.add_(dp.view_as(p).to(p.dtype), alpha=float(lr))
        after = position_logps(model, observed)
    return {"observed_token": y.cpu(), "pi_token": pi.gather(1, y[:, None]).squeeze(1).cpu(),
            "kg_token": kg_token.cpu(), "kg_expect": kg_expect.cpu(), "kg_norm": kg.norm(dim=1).cpu(),
            "g_norm": g_sq ** 0.5, "predicted": (-float(lr) * (kg_token - kg_expect)).cpu(),
            "realised": (after.double() - before.double()).float()}
