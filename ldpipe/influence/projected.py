"""Projected eNTK: a LoGra-style factored random projection of each layer's gradient computed inside the backward
hooks (never a dense projection of materialised gradients); projection_coverage says which parameters it covers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn as nn

from ldpipe.errors import LdpipeError
from ldpipe.influence.entk import (
    Pair,
    Precond,
    Update,
    _as_updates,
    _check_pairs,
    _check_precond,
    _combine,
    _select,
    _unique_pairs,
)
from ldpipe.model.lm import eval_mode
from ldpipe.model.scoring import batch_logps

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


def _kind(mod: nn.Module) -> str | None:
    """How a module's weight gradient factors: "linear" (nn.Linear, W [out, in]: sum_t delta_t x_t^T), "conv1d"
    (transformers' Conv1D of GPT-2, W [in, out], y = x W + b: sum_t x_t delta_t^T), "embedding" (rows are tokens:
    sum_t e_tok delta_t^T), or None (not covered)."""
    # Only modules that compute exactly what the factorisation assumes: a subclass with its own forward (a quantised
    # linear, an embedding that rescales) would get a wrong gradient, so it is left uncovered, except the scaled
    # embedding of Gemma-style models, whose output is embed_scale * W[token] (_embedding_scale).
    if isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
        return "linear"
    if isinstance(mod, nn.Embedding) and _embedding_scale(mod) is not None:
        return "embedding"
    if type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers."):
        return "conv1d"
    return None


def _embedding_scale(mod: nn.Embedding) -> float | None:
    """The factor an embedding multiplies its rows by: 1 for nn.Embedding's own forward, `embed_scale` for the
    scaled word embeddings of Gemma-style models (sqrt(hidden)), None for any other override (not covered)."""
    if type(mod).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(mod, "embed_scale", None)
    if scale is not None and type(mod).__name__.endswith("ScaledWordEmbedding"):
        return float(scale)
    return None


def projection_coverage(model: nn.Module, params: Sequence[str] | None = None) -> dict:
    """Which selected parameters projected_entk covers: Linear (and GPT-2's Conv1D) weights/biases and Embedding
    weights.

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
        if _kind(mod) is not None:
            for p in (mod.weight, getattr(mod, "bias", None)):
                if p is not None and names.get(id(p)) in selected:
                    out.append(names[id(p)])
    return list(dict.fromkeys(out))


class _Projector:
    """Forward hooks record each Linear/Conv1D/Embedding call; after autograd.grad on the outputs the
    per-example projected gradient sum_t (P_row u_t)(P_col v_t)^T is formed from the factors only.

    Attribution to sequences: a call's positions belong to the batch rows of its input ([B, T, .]) or, for the
    output head that batch_logps applies to the flattened response positions, to the owner of each position. A call
    broadcast over the batch (input and output batch 1 while the batch has B > 1 rows: GPT-2's learned position
    embedding of position ids [1, T]) is used by every sequence at the same positions; its summed output gradient
    cannot be split afterwards, so the hook hands the model B copies of the output instead (the same values, so
    the forward is unchanged) and each copy's gradient is its own sequence's: per sequence,
    sum_t e_pos(t) delta_{b,t}^T.
    """

    def __init__(self, model: nn.Module, selected: dict[str, nn.Parameter], rank: int, seed: int,
                 precond: Precond | None) -> None:
        names = _param_name_map(model)
        dev = next(iter(selected.values())).device
        self.model = model
        self.blocks: dict[str, _Block] = {}
        self.modules: list[tuple[nn.Module, str | None, str | None]] = []  # module, weight name, bias name
        for mod in model.modules():
            if _kind(mod) is None:
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
                rows, cols = mod.weight.shape  # Linear [out, in]; Conv1D [in, out]; Embedding [vocab, hidden]
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
        B = len(pairs)

        def hook(mod, inputs, output):
            x = inputs[0].detach()
            if B > 1 and output.dim() >= 3 and output.size(0) == 1 and x.size(0) == 1:
                # broadcast over the batch (class docstring): one copy per sequence, each with its own gradient
                output = output.expand(B, *output.shape[1:]).contiguous()
                x = x.expand(B, *x.shape[1:])
                records.append((mod, *self.names[mod], x, output))
                return output
            records.append((mod, *self.names[mod], x, output))
            return None

        handles = [m.register_forward_hook(hook) for m, _, _ in self.modules]
        try:
            logp, _ = batch_logps(self.model, pairs)
        finally:
            for h in handles:
                h.remove()
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
            kind = _kind(mod)
            if kind == "embedding":
                # grad of the table = scale * sum_t e_tok delta_t^T: rows are tokens, columns hidden units
                scale = _embedding_scale(mod)
                delta = delta if scale == 1.0 else delta * scale
                self._add(feats, wn, self._weight_feature(self.blocks[wn], x, delta, idx, B, train_side, onehot=True))
                continue
            if wn is not None:   # Linear: sum_t delta_t x_t^T; Conv1D (W [in, out]): sum_t x_t delta_t^T
                u, v = (delta, x) if kind == "linear" else (x, delta)
                self._add(feats, wn, self._weight_feature(self.blocks[wn], u, v, idx, B, train_side))
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
    Covered: Linear (and transformers' Conv1D, GPT-2's) weights and biases, Embedding weights; skipped: everything else
    (LayerNorm), see `projection_coverage`. A preconditioner is applied on the training side
    as an Adafactor-style rank-1 factorisation of v per matrix (exact for biases, and for
    matrices when v is rank 1). Pairs are processed `batch` at a time (rows are independent).
    """
    _check_pairs(probe_pairs, "probe_pairs")
    updates = _as_updates(train_pairs)
    selected = dict(_select(model, params))
    covered = {n: selected[n] for n in _covered_names(model, selected)}
    if not covered:
        raise LdpipeError("projected_entk: no selected parameter belongs to an nn.Linear, Conv1D or nn.Embedding")
    _check_precond(precond, list(covered.items()))
    proj = _Projector(model, covered, _check_rank(rank), seed, precond)
    pairs, combos = _unique_pairs(updates)
    d = _combine(_features(model, proj, pairs, batch, train_side=True), combos) * float(clip_factor)
    g = _features(model, proj, list(probe_pairs), batch, train_side=False)
    return (d @ g.T).cpu()
