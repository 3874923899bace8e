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

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ldpipe.errors import LdpipeError
from ldpipe.training.losses import preference_coefficient
from ldpipe.model.lm import eval_mode
from ldpipe.model.scoring import batch_logps

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


# --------------------------------------------------------------------------- factored projection

def _proj_matrix(seed: int, name: str, side: str, rank: int, dim: int, device) -> torch.Tensor | None:
    """Gaussian r x dim with entries N(0, 1/r) (so E[P^T P] = I), or None (identity) when dim <= rank.

    Keyed by (seed, parameter name, side) through a stable hash, so the same seed gives the
    same projection in every process and at every checkpoint (R10).
    """
    if dim <= rank:
        return None
    h = hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return (torch.randn(rank, dim, generator=gen) / rank ** 0.5).to(device)


def _rank1_factors(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column factors a, b with a b^T ~= p, for p = 1/sqrt(v+eps) (Adafactor-style on v; exact if v is rank 1)."""
    v = 1.0 / p.double().clamp_min(1e-30) ** 2
    r, c, s = v.sum(1), v.sum(0), v.sum()
    return (s ** 0.25 / r.sqrt()).float(), (s ** 0.25 / c.sqrt()).float()


@dataclass
class _Block:
    """One projected parameter: a matrix W [rows, cols] with per-example grad sum_t u_t v_t^T, or a bias sum_t u_t."""
    name: str
    rows: int
    cols: int  # 0 for a bias
    p_row: torch.Tensor | None
    p_col: torch.Tensor | None
    s_row: torch.Tensor | None = None  # preconditioner factors (training side)
    s_col: torch.Tensor | None = None

    @property
    def width(self) -> int:
        r = self.p_row.size(0) if self.p_row is not None else self.rows
        if self.cols == 0:
            return r
        return r * (self.p_col.size(0) if self.p_col is not None else self.cols)


def projection_coverage(model: nn.Module, params: Sequence[str] | None = None) -> dict:
    """Which selected parameters projected_entk covers: Linear weights/biases and Embedding weights.

    Returns {"covered": n, "total": n, "share": covered/total, "skipped": [names]}.
    """
    selected = dict(_select(model, params))
    covered = set(_covered_names(model, selected))
    tot = sum(p.numel() for p in selected.values())
    cov = sum(selected[n].numel() for n in covered)
    return {"covered": cov, "total": tot, "share": cov / tot,
            "skipped": [n for n in selected if n not in covered]}


def _param_name_map(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _covered_names(model: nn.Module, selected: dict[str, nn.Parameter]) -> list[str]:
    names = _param_name_map(model)
    out = []
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            for p in (mod.weight, getattr(mod, "bias", None)):
                if p is not None and names.get(id(p)) in selected:
                    out.append(names[id(p)])
    return list(dict.fromkeys(out))


class _Projector:
    """Forward hooks record each Linear/Embedding call; after autograd.grad on the outputs the
    per-example projected gradient sum_t (P_row u_t)(P_col v_t)^T is formed from the factors only.
    """

    def __init__(self, model: nn.Module, selected: dict[str, nn.Parameter], rank: int, seed: int,
                 precond: Precond | None) -> None:
        names = _param_name_map(model)
        dev = next(iter(selected.values())).device
        self.model = model
        self.blocks: dict[str, _Block] = {}
        self.modules: list[tuple[nn.Module, str | None, str | None]] = []  # module, weight name, bias name
        for mod in model.modules():
            if not isinstance(mod, (nn.Linear, nn.Embedding)):
                continue
            wn = names.get(id(mod.weight))
            wn = wn if wn in selected else None
            b = getattr(mod, "bias", None)
            bn = names.get(id(b)) if b is not None else None
            bn = bn if bn in selected else None
            if wn is None and bn is None:
                continue
            self.modules.append((mod, wn, bn))
            if wn is not None and wn not in self.blocks:
                rows, cols = mod.weight.shape  # Linear [out, in]; Embedding [vocab, hidden]
                blk = _Block(wn, rows, cols, _proj_matrix(seed, wn, "row", rank, rows, dev),
                             _proj_matrix(seed, wn, "col", rank, cols, dev))
                if precond is not None:
                    blk.s_row, blk.s_col = (t.to(dev) for t in _rank1_factors(precond[wn]))
                self.blocks[wn] = blk
            if bn is not None and bn not in self.blocks:
                blk = _Block(bn, b.numel(), 0, _proj_matrix(seed, bn, "row", rank, b.numel(), dev), None)
                if precond is not None:
                    blk.s_row = precond[bn].detach().reshape(-1).float().to(dev)
                self.blocks[bn] = blk
        self.order = list(self.blocks)
        self.width = sum(self.blocks[n].width for n in self.order)
        self.names = {m: (wn, bn) for m, wn, bn in self.modules}

    def features(self, pairs: Sequence[Pair], *, train_side: bool) -> torch.Tensor:
        """[B, width] projected per-sequence gradients for one batch of pairs."""
        records: list[tuple[nn.Module, str | None, str | None, torch.Tensor, torch.Tensor]] = []

        def hook(mod, inputs, output):
            records.append((mod, *self.names[mod], inputs[0].detach(), output))

        handles = [m.register_forward_hook(hook) for m, _, _ in self.modules]
        try:
            logp, _ = batch_logps(self.model, pairs)
        finally:
            for h in handles:
                h.remove()
        B = len(pairs)
        # batch_logps applies the output head to the response positions only, flattened row-major.
        owner = torch.repeat_interleave(torch.arange(B), torch.tensor([len(r) for _, r in pairs])).to(logp.device)
        # Outputs that do not require grad (a frozen module fed by frozen inputs) carry no gradient.
        records = [r for r in records if r[4].requires_grad]
        if not records:
            return torch.zeros(B, self.width, device=logp.device)
        grads = torch.autograd.grad(logp.sum(), [r[4] for r in records], allow_unused=True)
        feats = {n: None for n in self.order}
        for (mod, wn, bn, x, _), delta in zip(records, grads):
            if delta is None:
                continue
            idx = self._owner(x, delta, B, owner)
            if isinstance(mod, nn.Embedding):
                # grad of the table = sum_t e_tok delta_t^T: rows are tokens, columns hidden units
                self._add(feats, wn, self._weight_feature(self.blocks[wn], x, delta, idx, B, train_side, onehot=True))
                continue
            if wn is not None:
                self._add(feats, wn, self._weight_feature(self.blocks[wn], delta, x, idx, B, train_side))
            if bn is not None:
                self._add(feats, bn, self._bias_feature(self.blocks[bn], delta, idx, B, train_side))
        dev = logp.device
        parts = [feats[n] if feats[n] is not None else torch.zeros(B, self.blocks[n].width, device=dev)
                 for n in self.order]
        return torch.cat(parts, dim=1)

    @staticmethod
    def _add(feats: dict, name: str, f: torch.Tensor) -> None:
        feats[name] = f if feats[name] is None else feats[name] + f  # tied weights: contributions add

    @staticmethod
    def _owner(x: torch.Tensor, delta: torch.Tensor, B: int, owner: torch.Tensor) -> torch.Tensor:
        """Example index of every position (flattened), for [B, T, .] calls and the flattened head call."""
        lead = delta.shape[:-1]
        if len(lead) == 2 and lead[0] == B:
            return torch.arange(B, device=delta.device)[:, None].expand(lead).reshape(-1)
        if len(lead) == 1 and lead[0] == owner.numel():
            return owner
        raise LdpipeError(f"projected_entk: cannot attribute a module call with output shape {tuple(delta.shape)} "
                          f"to the {B} examples of the batch")

    @staticmethod
    def _side(vec: torch.Tensor, proj: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is not None:
            vec = vec * scale
        return vec if proj is None else vec @ proj.T

    def _weight_feature(self, blk: _Block, u, v, idx, B, train_side, onehot=False) -> torch.Tensor:
        s_row = blk.s_row if train_side else None
        s_col = blk.s_col if train_side else None
        v = v.reshape(-1, v.size(-1)).float()
        if onehot:
            tok = u.reshape(-1)
            # P_row e_tok is a column of P_row: gather instead of forming one-hot vectors.
            pu = (blk.p_row[:, tok].T if blk.p_row is not None
                  else torch.nn.functional.one_hot(tok, blk.rows).float())
            if s_row is not None:
                pu = pu * s_row[tok][:, None]
        else:
            pu = self._side(u.reshape(-1, u.size(-1)).float(), blk.p_row, s_row)
        pv = self._side(v, blk.p_col, s_col)
        # Per example sum_t pu_t pv_t^T as one batched matmul over [B, T, r] (no [n_pos, r, r] outer products).
        a, b = self._by_example(pu, idx, B), self._by_example(pv, idx, B)
        return torch.bmm(a.transpose(1, 2), b).reshape(B, -1)

    @staticmethod
    def _by_example(x: torch.Tensor, idx: torch.Tensor, B: int) -> torch.Tensor:
        """[n_pos, r] rows grouped by example (idx is sorted) into a zero-padded [B, T_max, r]."""
        counts = torch.bincount(idx, minlength=B).tolist()
        return torch.nn.utils.rnn.pad_sequence(list(torch.split(x, counts)), batch_first=True)

    def _bias_feature(self, blk: _Block, delta, idx, B, train_side) -> torch.Tensor:
        d = delta.reshape(-1, delta.size(-1)).float()
        summed = torch.zeros(B, d.size(1), device=d.device).index_add_(0, idx, d)
        return self._side(summed, blk.p_row, blk.s_row if train_side else None)


def projected_features(model: nn.Module, pairs: Sequence[Pair], *, rank: int = 16, seed: int = 0,
                       params: Sequence[str] | None = None, batch: int = 16) -> torch.Tensor:
    """[N, k] projected per-sequence gradients (probe side: no preconditioner), e.g. to store per checkpoint."""
    _check_pairs(pairs, "pairs")
    selected = dict(_select(model, params))
    proj = _Projector(model, selected, _check_rank(rank), seed, None)
    return _features(model, proj, pairs, batch, train_side=False)


def _check_rank(rank: int) -> int:
    if rank < 1:
        raise LdpipeError(f"projection rank must be >= 1, got {rank}")
    return int(rank)


def _features(model, proj: _Projector, pairs, batch, *, train_side) -> torch.Tensor:
    if batch < 1:
        raise LdpipeError(f"batch must be >= 1, got {batch}")
    with eval_mode(model):
        parts = [proj.features(pairs[s: s + batch], train_side=train_side) for s in range(0, len(pairs), batch)]
    return torch.cat(parts, dim=0)


def projected_entk(model: nn.Module, train_pairs: Sequence[Union[Pair, Update]], probe_pairs: Sequence[Pair], *,
                   rank: int = 16, seed: int = 0, precond: Precond | None = None, clip_factor: float = 1.0,
                   params: Sequence[str] | None = None, batch: int = 16) -> torch.Tensor:
    """[N_train, M_probe] fp32 estimate of exact_entk from factored per-layer projections (LoGra-style).

    For a weight W [rows, cols] with per-example gradient sum_t u_t v_t^T the feature is
    sum_t (P_row u_t)(P_col v_t)^T, P Gaussian / sqrt(rank); a side with dim <= rank is kept
    exact (identity), so a rank >= every dimension reproduces exact_entk on the covered
    parameters. The inner product is unbiased for the true one. Only the factors are ever
    projected: no per-example gradient is materialised and no dense JL is used (it would cost many backward passes).
    Covered: Linear weights and biases, Embedding weights; skipped: everything else
    (LayerNorm), see `projection_coverage`. A preconditioner is applied on the training side
    as an Adafactor-style rank-1 factorisation of v per matrix (exact for biases, and for
    matrices when v is rank 1). Pairs are processed `batch` at a time (rows are independent).
    """
    _check_pairs(probe_pairs, "probe_pairs")
    updates = _as_updates(train_pairs)
    selected = dict(_select(model, params))
    covered = {n: selected[n] for n in _covered_names(model, selected)}
    if not covered:
        raise LdpipeError("projected_entk: no selected parameter belongs to an nn.Linear or nn.Embedding")
    _check_precond(precond, list(covered.items()))
    proj = _Projector(model, covered, _check_rank(rank), seed, precond)
    pairs, combos = _unique_pairs(updates)
    d = _combine(_features(model, proj, pairs, batch, train_side=True), combos) * float(clip_factor)
    g = _features(model, proj, list(probe_pairs), batch, train_side=False)
    return (d @ g.T).cpu()


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
