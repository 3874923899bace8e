"""Influence analyses of a declared run (issue 5): the eNTK matrix, its agreement checks, A-K-G, the heat map.

The math lives in `ldpipe.influence.entk`; this module maps a run onto it:
- checkpoints: the run's start (base model or parent's final), snapshots at
  <run_dir>/checkpoints/step-XXXXXXX (evenly thinned to `max_snapshots`), and <run_dir>/final;
- updates: the run's loss at the checkpoint as coefficients on per-sequence gradients
  (SFT: 1 * g; DPO: beta*sigma(-beta*m) on g+ and -g-, m against the run's reference = its start
  checkpoint; cDPO/IPO likewise), the per-sequence unit of docs/glossary.md#entk;
- step size: lr_eff = lr_t * clip_t / batch_size, read from the run's train_metrics (the step that
  follows the checkpoint, or the last step for the final one): a batch-mean loss gives one example
  1/B of the step, and the recorded clip factor scales all of it.
- Adam/RMSprop (docs/glossary.md#entk): `exact` / `projected` are the SGD direction. Where the checkpoint holds the run's
  optimizer state (<ckpt>/optimizer_state.pt, written by train.py with snapshots and the final model),
  `exact_precond` / `projected_precond` apply the preconditioner P of ldpipe.training.optim_state.preconditioner:
  the first-order effect of one example's gradient on the NEXT update (Adam: (1-b1)/(1-b1^(t+1)) /
  (sqrt(b2 v/(1-b2^(t+1))) + eps); later momentum carry-over and the g^2 effect on v ignored). The
  `start` checkpoint always has a fresh optimizer (Adam's first step ~lr*sign(g) has no linearisation):
  SGD only there, and every fallback is logged with its reason.
- `naive_optimizer`: one REAL step of the run's optimizer loaded with the checkpoint's state (fresh at
  start), lr_t, the example's loss/B times the run's clip factor clip_t, minus the same optimizer's step
  on a zero gradient (the momentum drift every example shares). `influence_agreement` compares `exact`
  (before) and `exact_precond` (after) against it.
- accumulation (TracIn-style): sum over checkpoints of lr_eff_t x influence_t (`accumulate`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import polars as pl
import torch

from ldpipe.analysis.checkpoints import Checkpoint
from ldpipe.errors import LdpipeError
from ldpipe.influence.akg import akg_factors, naive_optimizer_step, optimizer_drift
from ldpipe.influence.entk import Update, agreement, exact_entk, naive_one_step, untouched_moved
from ldpipe.influence.inputs import Unit, observed_probes, run_checkpoints, select_units, step_factors, training_units
from ldpipe.influence.projected import projected_entk
from ldpipe.schema import AKG_SCHEMA, INFLUENCE_AGREEMENT_SCHEMA, INFLUENCE_SCHEMA
from ldpipe.spec import ExperimentSpec, RunSpec
from ldpipe.training.optim_state import load_into, load_optimizer_state, preconditioner, untouched

Log = Callable[[str], None]
Pair = tuple[list[int], list[int]]
KEY = ["run_id", "checkpoint", "checkpoint_step", "train_example_id", "train_response_type",
       "observed_example_id", "observed_response_type"]


# --------------------------------------------------------------------------- loss -> update coefficients

class _RunLoss:
    """The run's per-example loss at a checkpoint, as an Update (coefficients) and as a differentiable loss."""

    def __init__(self, run: RunSpec, pairs: list[tuple[Pair, Pair | None]], ref: torch.Tensor | None):
        self.run, self.pairs, self.ref = run, pairs, ref  # ref: [n, 2] reference log pi (chosen, rejected)

    @staticmethod
    def reference(run: RunSpec, model, pairs: list[tuple[Pair, Pair | None]]) -> torch.Tensor | None:
        if run.algo == "sft":
            return None
        from ldpipe.model.scoring import batch_logps

        with torch.no_grad():
            return torch.stack([batch_logps(model, [c, r])[0] for c, r in pairs]).double()

    def _margins(self, model) -> list[float]:
        from ldpipe.model.scoring import batch_logps

        with torch.no_grad():
            pol = torch.stack([batch_logps(model, [c, r])[0] for c, r in self.pairs]).double()
        return ((pol[:, 0] - self.ref[:, 0]) - (pol[:, 1] - self.ref[:, 1])).tolist()

    def updates(self, model) -> list[Update]:
        if self.run.algo == "sft":
            return [Update(((c, 1.0),)) for c, _ in self.pairs]
        from ldpipe.training.losses import preference_coefficient

        out = []
        for (c, r), m in zip(self.pairs, self._margins(model)):
            k = float(preference_coefficient(m, self.run.beta, algo=self.run.algo,
                                             label_smoothing=self.run.label_smoothing))
            out.append(Update(((c, k), (r, -k))))
        return out

    def loss_fn(self, i: int):
        from ldpipe.model.scoring import batch_logps
        from ldpipe.training.losses import dpo_loss, ipo_loss

        c, r = self.pairs[i]
        B = self.run.batch_size  # one example's share of a batch-mean loss

        def fn(model):
            if self.run.algo == "sft":
                return -batch_logps(model, [c])[0].sum() / B
            lp = batch_logps(model, [c, r])[0]
            rc, rr = self.ref[i, 0:1].float(), self.ref[i, 1:2].float()
            if self.run.algo == "ipo":
                return ipo_loss(lp[:1], lp[1:], rc, rr, self.run.beta)[0] / B
            return dpo_loss(lp[:1], lp[1:], rc, rr, self.run.beta, self.run.label_smoothing)[0] / B
        return fn


def _encode_units(tok, spec: ExperimentSpec, units: list[Unit]) -> list[tuple[Pair, Pair | None]]:
    from ldpipe.model.scoring import encode_pair, encode_preference

    kw = {"max_prompt_tokens": spec.probes.max_prompt_tokens, "max_response_tokens": spec.probes.max_response_tokens,
          "chat_template": spec.probes.chat_template}
    out = []
    for u in units:
        if u.rejected is None:
            out.append((encode_pair(tok, u.prompt, u.response, **kw), None))
        else:   # one cut for the pair, as the run's objective encoded it
            p, c, r = encode_preference(tok, u.prompt, u.response, u.rejected, **kw)
            out.append(((p, c), (p, r)))
    return out


def _encode_observed(tok, spec: ExperimentSpec, probes: pl.DataFrame) -> tuple[list[Pair], list[tuple[str, str]]]:
    from ldpipe.model.scoring import encode_probes

    enc = encode_probes(tok, probes, max_prompt_tokens=spec.probes.max_prompt_tokens,
                        max_response_tokens=spec.probes.max_response_tokens, source="influence probes",
                        chat_template=spec.probes.chat_template)
    pairs, labels = [], []
    for e in enc:
        for t, r in zip(e.response_types, e.response_ids):
            pairs.append((e.prompt_ids, r))
            labels.append((e.example_id, t))
    return pairs, labels


@contextmanager
def _threads(n: int):
    """torch intra-op threads for the duration (2 contended threads can be many times slower than 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def influence_parameters(run: RunSpec) -> str:
    """Which parameters the eNTK of `run` is over, in words: a LoRA run's adapter only (what makes influence
    affordable on a large model), else every weight."""
    if run.lora is None:
        return "all parameters"
    lo = run.lora
    return (f"the LoRA adapter only (r={lo.r}, alpha={lo.alpha:g}, modules "
            f"{list(lo.target_modules) if lo.target_modules else 'peft default'})")


class _RunContext:
    """Everything shared by a run's analyses: checkpoints, step sizes, units, observed probes, reference."""

    def __init__(self, spec: ExperimentSpec, run: RunSpec, files, device: str):
        from ldpipe.model.checkpoints import load_model_and_tokenizer
        from ldpipe.model.lm import resolve_device

        self.spec, self.run, self.files, self.inf = spec, run, files, spec.influence
        self.dev = resolve_device(device)
        self.run_id = spec.run_id(run)
        self.checkpoints = run_checkpoints(spec, run, files)
        self.factors = step_factors(spec, run, files, [c.step for c in self.checkpoints])
        self.lr_eff = {s: lr * clip / run.batch_size for s, (lr, clip) in self.factors.items()}
        self.probes = observed_probes(spec, files, types=self.inf.observed_types)
        prompts = self.probes["example_id"].unique(maintain_order=True).to_list()
        self.units = select_units(training_units(spec, run, files), prompts, self.inf.n_train, self.inf.seed)
        if not self.units:
            raise LdpipeError(f"run {self.run_id}: no training examples to analyse")
        self._load = load_model_and_tokenizer
        from ldpipe.training.runs import start_point

        self.start_path = start_point(spec, run, files).path
        self._ref = None

    def load(self, ckpt: Checkpoint):
        model, tok = self._load(ckpt.path, device=self.dev)
        if self.run.lora is not None:   # the start of a LoRA run: the adapter as training initialised it
            from ldpipe.model.lora import apply_lora

            model = apply_lora(model, self.run.lora, ckpt.path, seed=self.run.seed).to(self.dev)
        return model, tok

    def optimizer_state(self, ckpt: Checkpoint, model, log: Log, updates=None) -> tuple[dict | None, dict | None, str]:
        """(saved state, preconditioner, label) of the run's optimizer at `ckpt`; None with a logged reason (also
        when the training `updates` move coordinates the state has never updated: no linearisation there)."""
        if ckpt.label == "start":  # the run's own optimizer is fresh there (a parent's final state is not it)
            st, why = None, "the run starts with a fresh optimizer"
        else:
            st = load_optimizer_state(ckpt.path)
            why = f"no {ckpt.path}/optimizer_state.pt (run trained before optimizer states were saved)"
        if st is not None and st["optimizer"] not in (("adamw", "adam") if self.run.optimizer == "adamw"
                                                      else ("rmsprop",)):
            st, why = None, f"saved state is {st['optimizer']}, the run declares {self.run.optimizer}"
        pre, label = (preconditioner(st, model) if st is not None else (None, why))
        if pre is not None and updates is not None:
            n = untouched_moved(model, updates, untouched(st))
            if n:
                pre, label = None, (f"{st['optimizer']} state at step {st['step']} has never updated {n} coordinate(s) "
                                    "that the influence examples move (no gradient reached them yet, e.g. "
                                    "embedding rows of tokens in no batch so far): the first-order preconditioner "
                                    "is undefined there (Adam's first update is ~lr·sign(g)), SGD direction used")
        if pre is None:
            log(f"[{self.run_id}] {ckpt.label}: SGD direction only, no preconditioned influence: {label}")
            return st, None, "fresh" if st is None else f"{st['optimizer']}@{st['step']}"
        return st, pre, f"{st['optimizer']}@{st['step']}"

    def run_loss(self, tok, pairs) -> _RunLoss:
        if self.run.algo != "sft" and self._ref is None:
            ref_model, _ = self._load(self.start_path, device=self.dev)  # the run's DPO/IPO reference
            self._ref = _RunLoss.reference(self.run, ref_model, pairs)
            del ref_model
        return _RunLoss(self.run, pairs, self._ref)


# --------------------------------------------------------------------------- the matrix

def compute_influence(spec: ExperimentSpec, run: RunSpec, files, *, device: str = "cpu",
                      log: Log = print) -> tuple[pl.DataFrame, dict]:
    """INFLUENCE_SCHEMA rows for every selected checkpoint and method, and timings {method: seconds}."""
    with _threads(spec.influence.threads):
        return _compute_influence(spec, run, files, device=device, log=log)


def _compute_influence(spec, run, files, *, device, log):
    ctx = _RunContext(spec, run, files, device)
    inf = ctx.inf
    rows: list[dict] = []
    seconds: dict[str, float] = {m: 0.0 for m in inf.methods}
    for ckpt in ctx.checkpoints:
        model, tok = ctx.load(ckpt)
        units_enc = _encode_units(tok, spec, ctx.units)
        obs_pairs, labels = _encode_observed(tok, spec, ctx.probes)
        rl = ctx.run_loss(tok, units_enc)
        updates = rl.updates(model)
        eta = ctx.lr_eff[ckpt.step]

        lr_t, clip_t = ctx.factors[ckpt.step]
        st, pre, label = ctx.optimizer_state(ckpt, model, log, updates)

        def emit(method: str, i: int, values, entk=None, precond=None):
            u = ctx.units[i]
            for j, (eid, typ) in enumerate(labels):
                rows.append({"run_id": ctx.run_id, "checkpoint": ckpt.label, "checkpoint_step": ckpt.step,
                             "method": method, "train_example_id": u.example_id,
                             "train_response_type": u.response_type, "observed_example_id": eid,
                             "observed_response_type": typ, "entk": None if entk is None else float(entk[j]),
                             "lr_eff": eta, "value": float(values[j]), "precond": precond})

        for method in inf.methods:
            variants = [(method, None)] + ([(f"{method}_precond", pre)] if pre is not None and method in
                                           ("exact", "projected") else [])
            for name, P in variants:
                t0 = time.perf_counter()
                if method in ("exact", "projected"):
                    K = (exact_entk(model, updates, obs_pairs, block=16, precond=P) if method == "exact"
                         else projected_entk(model, updates, obs_pairs, rank=inf.rank, seed=inf.seed, precond=P))
                    for i in range(len(updates)):
                        emit(name, i, eta * K[i], K[i], None if P is None else label)
                elif method == "naive":
                    for i in range(min(inf.n_naive, len(updates))):
                        emit(method, i, naive_one_step(model, updates, obs_pairs, lr=eta, i=i))
                else:  # naive_optimizer: the run's optimizer as it stood at the checkpoint
                    from ldpipe.training.loop import make_optimizer

                    def factory(ps, st=st):
                        opt = _fresh_optimizer(make_optimizer, run, ps, lr_t)
                        return load_into(opt, model, st) if st is not None else opt

                    drift = optimizer_drift(model, obs_pairs, optimizer_factory=factory)
                    for i in range(min(inf.n_naive, len(updates))):
                        delta, _ = naive_optimizer_step(model, rl.loss_fn(i), obs_pairs, grad_scale=clip_t,
                                                        drift=drift, optimizer_factory=factory)
                        emit(method, i, delta, precond=label)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        log(f"[{ctx.run_id}] influence at {ckpt.label} (step {ckpt.step}, lr_eff {eta:.3g}, optimizer {label}): "
            f"{len(updates)} updates x {len(obs_pairs)} probes")
        del model
    return pl.DataFrame(rows, schema=INFLUENCE_SCHEMA), {k: round(v, 3) for k, v in seconds.items()}


def _fresh_optimizer(make_optimizer, run: RunSpec, params, lr: float) -> torch.optim.Optimizer:
    opt = make_optimizer(run, params)
    for g in opt.param_groups:
        g["lr"] = lr
    return opt


AGREEMENT_PAIRS = (("projected", "exact"), ("naive", "exact"), ("projected_precond", "exact_precond"),
                   ("exact", "naive_optimizer"), ("exact_precond", "naive_optimizer"))


def agreement_table(influence: pl.DataFrame) -> pl.DataFrame:
    """INFLUENCE_AGREEMENT_SCHEMA: each estimate against its reference on the entries both have, per checkpoint.

    projected, naive vs exact; projected_precond vs exact_precond (projection + rank-1 preconditioner);
    exact (SGD) and exact_precond vs naive_optimizer (the real loaded-optimizer step): without and with the preconditioner.
    """
    out = []
    for est, ref in AGREEMENT_PAIRS:
        other = influence.filter(pl.col("method") == est)
        exact = influence.filter(pl.col("method") == ref)
        if other.is_empty() or exact.is_empty():
            continue
        j = other.join(exact, on=KEY, suffix="_ref")
        for (run_id, ckpt, step), part in j.group_by(["run_id", "checkpoint", "checkpoint_step"],
                                                      maintain_order=True):
            if part.height < 2:
                continue
            a = agreement(torch.tensor(part["value"].to_numpy()), torch.tensor(part["value_ref"].to_numpy()))
            out.append({"run_id": run_id, "checkpoint": ckpt, "checkpoint_step": step, "estimate": est,
                        "reference": ref, **a})
    return pl.DataFrame(out, schema=INFLUENCE_AGREEMENT_SCHEMA).sort("run_id", "checkpoint_step", "estimate")


def accumulate(influence: pl.DataFrame) -> pl.DataFrame:
    """TracIn-style: per method and (update, observed) pair, the sum over checkpoints of lr_eff_t x influence_t."""
    keys = [c for c in KEY if c not in ("checkpoint", "checkpoint_step")]
    return (influence.group_by(["method", *keys]).agg(pl.col("value").sum().alias("accumulated"),
                                                       pl.len().alias("n_checkpoints"))
            .sort(["method", *keys]))


# --------------------------------------------------------------------------- A-K-G

def compute_akg(spec: ExperimentSpec, run: RunSpec, files, *, device: str = "cpu", log: Log = print) -> pl.DataFrame:
    """AKG_SCHEMA rows: for the first `n_akg` training examples, every position of (a) the example's own
    response(s) and (b) one other observed probe prompt's chosen response, at every selected checkpoint."""
    with _threads(spec.influence.threads):
        return _compute_akg(spec, run, files, device=device, log=log)


def _compute_akg(spec, run, files, *, device, log):
    ctx = _RunContext(spec, run, files, device)
    rows = []
    units = ctx.units[: ctx.inf.n_akg]
    for ckpt in ctx.checkpoints:
        model, tok = ctx.load(ckpt)
        units_enc = _encode_units(tok, spec, ctx.units)
        updates = ctx.run_loss(tok, units_enc).updates(model)[: len(units)]
        obs_pairs, labels = _encode_observed(tok, spec, ctx.probes)
        eta = ctx.lr_eff[ckpt.step]
        for u, (c, r), upd in zip(units, units_enc, updates):
            targets = [(u.example_id, "chosen" if run.algo != "sft" else u.response_type, c)]
            if r is not None:
                targets.append((u.example_id, "rejected", r))
            other = next(((e, t, p) for p, (e, t) in zip(obs_pairs, labels) if e != u.example_id and t == "chosen"),
                         None)
            if other is not None:
                targets.append(other)
            for eid, typ, pair in targets:
                f = akg_factors(model, upd, pair, lr=eta)
                for t in range(len(pair[1])):
                    rows.append({"run_id": ctx.run_id, "checkpoint": ckpt.label, "checkpoint_step": ckpt.step,
                                 "train_example_id": u.example_id, "train_response_type": u.response_type,
                                 "observed_example_id": eid, "observed_response_type": typ, "position": t,
                                 "observed_token": int(f["observed_token"][t]), "lr_eff": eta,
                                 "pi_token": float(f["pi_token"][t]), "kg_token": float(f["kg_token"][t]),
                                 "kg_expect": float(f["kg_expect"][t]), "kg_norm": float(f["kg_norm"][t]),
                                 "g_norm": float(f["g_norm"]), "predicted_delta": float(f["predicted"][t]),
                                 "realised_delta": float(f["realised"][t])})
        log(f"[{ctx.run_id}] A-K-G at {ckpt.label}: {len(units)} updates")
        del model
    return pl.DataFrame(rows, schema=AKG_SCHEMA)
