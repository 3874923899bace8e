"""Cross-example influence: how one update on training example i moves log pi(y_j|x_j) of probe j.

Unit (docs/glossary.md#entk): the per-sequence gradient g(x, y) = grad_theta log pi(y|x), the
log-prob SUMMED over response tokens exactly as `scoring.batch_logps` computes it for
training. One gradient store then serves every loss, because each loss's per-example
gradient is a weighted sum of such g's:

    SFT      dL/dtheta = -g(x, y)                                   -> direction  1 * g
    DPO      dL/dtheta = -beta*sigmoid(-beta*m) * (g(x,y+) - g(x,y-))  -> c = beta*sigmoid(-beta*m)
    IPO      dL/dtheta = 2(m - 1/(2 beta)) * (g(x,y+) - g(x,y-))     -> c = 1/beta - 2m

An `Update` holds those (pair, coefficient) terms; its direction is d_i = sum_k c_k g_k.
A plain SGD step theta' = theta + eta * d_i changes a probe's log-prob by, to first order,

    Delta log pi(y_j|x_j) ~= eta * (d_i . g_j)          (the "eNTK" entry K[i, j])

For Adam/RMSprop the step is eta * clip * (P * d_i) with P ~ 1/(sqrt(v) + eps) per parameter
(docs/glossary.md#entk; ldpipe.training.optim_state.preconditioner builds P from a checkpoint's saved optimizer state); `precond` and `clip_factor` apply that on the training side only. Losses that are batch
MEANS scale each example by 1/B: pass lr/B (or a weight) for a per-example prediction.

Three ways to get K (docs/glossary.md#entk):
- exact_entk: flattened per-sequence gradients, training directions resident, probes in blocks;
- projected_entk: LoGra-style factored random projection inside the backward, never a dense
  JL of the full gradient; covers every nn.Linear and nn.Embedding weight (and Linear biases);
  LayerNorm parameters are skipped (see `projection_coverage`);
- naive_one_step: the validator - really take the step, re-score, restore the weights.
`agreement` compares two of them (Spearman, relative error, sign agreement); `akg_decomposition`
splits one entry into the paper's A·K·G factors at one observed position (tiny models: it forms
the V x P Jacobian); `akg_factors` gives the same factors' summaries at every observed position
from one Jacobian-vector product (any model size), with the realised change of a real SGD step.
`naive_optimizer_step` is the validator with the run's real optimizer (Adam/RMSprop, clipping), fresh or
loaded with a checkpoint's state (ldpipe.training.optim_state), minus its zero-gradient drift (`optimizer_drift`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ldpipe.errors import LdpipeError
from ldpipe.model.lm import eval_mode
from ldpipe.model.scoring import batch_logps
from ldpipe.training.losses import preference_coefficient

Pair = tuple[list[int], list[int]]
Precond = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- updates

@dataclass(frozen=True)
class Update:
    """One training example's update direction: sum_k coef_k * grad log pi(pair_k)."""
    terms: tuple[tuple[Pair, float], ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise LdpipeError("Update: needs at least one (pair, coefficient) term")


def sft_update(pair: Pair, weight: float = 1.0) -> Update:
    """SFT on one (prompt, response): loss -weight*log pi, direction weight * g."""
    return Update(((pair, float(weight)),))


def dpo_update(chosen: Pair, rejected: Pair, *, beta: float, margin: float, label_smoothing: float = 0.0) -> Update:
    """Sigmoid DPO (cDPO with label_smoothing) at reference-adjusted margin m: c * (g+ - g-) with
    c = losses.preference_coefficient (beta*sigmoid(-beta*m) without smoothing)."""
    if not beta > 0:
        raise LdpipeError(f"dpo_update: beta must be > 0, got {beta}")
    c = float(preference_coefficient(margin, beta, algo="dpo", label_smoothing=label_smoothing))
    return Update(((chosen, c), (rejected, -c)))


def ipo_update(chosen: Pair, rejected: Pair, *, beta: float, margin: float) -> Update:
    """IPO (m - 1/(2 beta))^2: c * (g+ - g-) with c = 1/beta - 2m (negative past the target margin)."""
    if not beta > 0:
        raise LdpipeError(f"ipo_update: beta must be > 0, got {beta}")
    c = float(preference_coefficient(margin, beta, algo="ipo"))
    return Update(((chosen, c), (rejected, -c)))


def _as_updates(train: Sequence[Union[Pair, Update]]) -> list[Update]:
    out = []
    for i, t in enumerate(train):
        if isinstance(t, Update):
            out.append(t)
        elif isinstance(t, (tuple, list)) and len(t) == 2:
            out.append(sft_update((list(t[0]), list(t[1]))))
        else:
            raise LdpipeError(f"train_pairs[{i}]: expected a (prompt_ids, response_ids) pair or an Update, "
                              f"got {type(t).__name__}")
    if not out:
        raise LdpipeError("no training pairs")
    return out


def _unique_pairs(updates: Sequence[Update]) -> tuple[list[Pair], list[list[tuple[int, float]]]]:
    """Distinct pairs (so a pair shared by several updates costs one gradient) and each update's (index, coef)."""
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    pairs: list[Pair] = []
    combos = []
    for u in updates:
        combo = []
        for (p, r), c in u.terms:
            key = (tuple(p), tuple(r))
            if key not in index:
                index[key] = len(pairs)
                pairs.append((list(p), list(r)))
            combo.append((index[key], float(c)))
        combos.append(combo)
    return pairs, combos


def _combine(rows: torch.Tensor, combos: list[list[tuple[int, float]]]) -> torch.Tensor:
    out = rows.new_zeros(len(combos), rows.size(1))
    for i, combo in enumerate(combos):
        for k, c in combo:
            out[i] += c * rows[k]
    return out


# --------------------------------------------------------------------------- parameters

def _select(model: nn.Module, params: Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    named = dict(model.named_parameters())  # shared (tied) tensors appear once
    if params is None:
        chosen = [(n, p) for n, p in named.items() if p.requires_grad]
    else:
        unknown = [n for n in params if n not in named]
        if unknown:
            raise LdpipeError(f"unknown parameter name(s) {unknown[:5]}; see model.named_parameters()")
        chosen = [(n, named[n]) for n in dict.fromkeys(params)]
    if not chosen:
        raise LdpipeError("no trainable parameters selected")
    return chosen


def _check_precond(precond: Precond | None, selected: list[tuple[str, nn.Parameter]]) -> None:
    if precond is None:
        return
    for n, p in selected:
        if n not in precond:
            raise LdpipeError(f"precond has no entry for parameter {n!r}; give 1/sqrt(v+eps) for every "
                              "selected parameter")
        if tuple(precond[n].shape) != tuple(p.shape):
            raise LdpipeError(f"precond[{n!r}] has shape {tuple(precond[n].shape)}, the parameter "
                              f"{tuple(p.shape)}")


def _flat_precond(precond: Precond | None, selected, device) -> torch.Tensor | None:
    if precond is None:
        return None
    return torch.cat([precond[n].detach().reshape(-1).to(device=device, dtype=torch.float32) for n, _ in selected])


def untouched_moved(model: nn.Module, train_pairs: Sequence[Union[Pair, Update]], untouched: dict[str, torch.Tensor],
                    *, params: Sequence[str] | None = None) -> int:
    """How many coordinates that the optimizer state has never updated (`untouched[name]`: a bool mask per
    parameter, e.g. Adam's v == 0) the training directions move. A first-order preconditioner is undefined
    there: Adam's first update of a coordinate is ~lr * sign(g), not linear in g, and 1/(sqrt(v) + eps)
    would blow the prediction up by ~1/eps."""
    selected = _select(model, params)
    pairs, combos = _unique_pairs(_as_updates(train_pairs))
    d = _combine(per_sequence_gradients(model, pairs, params=params), combos)
    mask = torch.cat([untouched[n].reshape(-1).to(d.device) if n in untouched
                      else torch.zeros(p.numel(), dtype=torch.bool, device=d.device) for n, p in selected])
    return int((d[:, mask] != 0).any(dim=0).sum())


@contextmanager
def _weights_restored(model: nn.Module, tensors: Sequence[torch.Tensor]):
    """Weights, .grad fields and train/eval mode restored bit-exactly on exit (eval mode inside)."""
    saved = [p.detach().clone() for p in tensors]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in tensors]
    with eval_mode(model):
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s, g in zip(tensors, saved, grads):
                    p.copy_(s)
                    p.grad = g


def _logp_change(model: nn.Module, tensors: Sequence[torch.Tensor], probe_pairs: Sequence[Pair],
                 apply: Callable[[], None]) -> torch.Tensor:
    """[M] fp64 change of every probe's log pi caused by `apply()` (which changes the weights); the weights
    (and .grad, train mode) are restored afterwards."""
    with _weights_restored(model, tensors):
        with torch.no_grad():
            before = batch_logps(model, probe_pairs)[0].double()
        apply()
        with torch.no_grad():
            after = batch_logps(model, probe_pairs)[0].double()
    return after - before


def _check_pairs(pairs: Sequence[Pair], what: str) -> None:
    for i, pr in enumerate(pairs):
        if not (isinstance(pr, (tuple, list)) and len(pr) == 2):
            raise LdpipeError(f"{what}[{i}]: expected a (prompt_ids, response_ids) pair")
        if not pr[0] or not pr[1]:
            raise LdpipeError(f"{what}[{i}]: empty prompt or response")


# --------------------------------------------------------------------------- exact gradients

def per_sequence_gradients(model: nn.Module, pairs: Sequence[Pair], *,
                           params: Sequence[str] | None = None) -> torch.Tensor:
    """[N, P] fp32: flattened grad of log pi(y|x) (summed over response tokens) for each pair.

    One forward/backward per pair, so the result is exact (no cross-row effects) and
    the parameters' .grad fields are left untouched.
    """
    _check_pairs(pairs, "pairs")
    selected = _select(model, params)
    tensors = [p for _, p in selected]
    total = sum(p.numel() for p in tensors)
    dev = tensors[0].device
    out = torch.zeros(len(pairs), total, dtype=torch.float32, device=dev)
    with eval_mode(model):
        for k, pair in enumerate(pairs):
            logp, _ = batch_logps(model, [pair])
            grads = torch.autograd.grad(logp[0], tensors, allow_unused=True)
            pos = 0
            for p, g in zip(tensors, grads):
                if g is not None:
                    out[k, pos: pos + p.numel()] = g.reshape(-1).float()
                pos += p.numel()
    return out


def _directions(model, updates, params, precond, clip_factor) -> torch.Tensor:
    """[N, P] training-side directions clip * P ⊙ sum_k c_k g_k."""
    selected = _select(model, params)
    _check_precond(precond, selected)
    pairs, combos = _unique_pairs(updates)
    d = _combine(per_sequence_gradients(model, pairs, params=params), combos)
    pv = _flat_precond(precond, selected, d.device)
    if pv is not None:
        d = d * pv
    return d * float(clip_factor)


def exact_entk(model: nn.Module, train_pairs: Sequence[Union[Pair, Update]], probe_pairs: Sequence[Pair], *,
               block: int = 64, precond: Precond | None = None, clip_factor: float = 1.0,
               params: Sequence[str] | None = None) -> torch.Tensor:
    """[N_train, M_probe] fp32 matrix d_i . g_j (so lr * row i predicts Delta log pi of every probe).

    Training directions stay resident ([N, P]); probe gradients are made `block` at a time,
    so memory is (N + block) * P floats.
    """
    if block < 1:
        raise LdpipeError(f"exact_entk: block must be >= 1, got {block}")
    _check_pairs(probe_pairs, "probe_pairs")
    d = _directions(model, _as_updates(train_pairs), params, precond, clip_factor)
    out = torch.empty(d.size(0), len(probe_pairs), dtype=torch.float32, device=d.device)
    for s in range(0, len(probe_pairs), block):
        g = per_sequence_gradients(model, probe_pairs[s: s + block], params=params)
        out[:, s: s + g.size(0)] = d @ g.T
    return out.cpu()


# --------------------------------------------------------------------------- naive one-step validator

def naive_one_step(model: nn.Module, train_pairs: Sequence[Union[Pair, Update]], probe_pairs: Sequence[Pair], *,
                   lr: float, i: int, precond: Precond | None = None, clip_factor: float = 1.0,
                   params: Sequence[str] | None = None) -> torch.Tensor:
    """[M] Delta log pi of every probe after one real step theta += lr*clip*(P ⊙ d_i); weights restored bit-exactly.

    For an Update the step uses its frozen coefficients, which is the true loss gradient
    at the current weights (e.g. DPO's sigmoid factor), so this is one real SGD step.
    """
    updates = _as_updates(train_pairs)
    if not 0 <= i < len(updates):
        raise LdpipeError(f"naive_one_step: i={i} outside 0..{len(updates) - 1}")
    _check_pairs(probe_pairs, "probe_pairs")
    selected = _select(model, params)
    _check_precond(precond, selected)
    tensors = [p for _, p in selected]
    terms = updates[i].terms

    def step() -> None:
        logp, _ = batch_logps(model, [pr for pr, _ in terms])
        objective = sum(c * logp[k] for k, (_, c) in enumerate(terms))
        grads = torch.autograd.grad(objective, tensors, allow_unused=True)
        with torch.no_grad():
            for (n, p), g in zip(selected, grads):
                if g is not None:
                    p.add_(g if precond is None else g * precond[n].to(g), alpha=float(lr) * float(clip_factor))

    return _logp_change(model, tensors, probe_pairs, step).float().cpu()


# --------------------------------------------------------------------------- agreement

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (so Spearman is right with ties)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        sums = np.bincount(inv, weights=ranks)
        ranks = sums[inv] / counts[inv]
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How well `a` (an estimate) matches `b` (the reference), over all entries.

    spearman: rank correlation; pearson; relative_error ||a-b||/||b||; sign_agreement: share of
    entries with the same sign; n: number of entries.
    """
    x = np.asarray(torch.as_tensor(a).detach().double().cpu().reshape(-1))
    y = np.asarray(torch.as_tensor(b).detach().double().cpu().reshape(-1))
    if x.shape != y.shape:
        raise LdpipeError(f"agreement: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    if x.size < 2:
        raise LdpipeError("agreement: need at least 2 entries")
    nb = np.linalg.norm(y)
    return {
        "spearman": _pearson(_ranks(x), _ranks(y)),
        "pearson": _pearson(x, y),
        "relative_error": float(np.linalg.norm(x - y) / nb) if nb > 0 else float("inf"),
        "sign_agreement": float((np.sign(x) == np.sign(y)).mean()),
        "n": int(x.size),
    }
