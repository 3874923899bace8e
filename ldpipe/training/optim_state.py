"""The optimizer's per-parameter state saved beside a model checkpoint, and the preconditioner it implies.

`save_optimizer_state(model, opt, ckpt_dir)` writes `<ckpt_dir>/optimizer_state.pt` (torch.save of plain
tensors and numbers, so `torch.load(weights_only=True)` reads it):

    {"format": 1, "optimizer": "adamw" | "adam" | "rmsprop", "step": int (optimizer steps taken),
     "hyper": {lr, betas, eps, weight_decay, alpha, momentum, centered, amsgrad, ...: plain numbers},
     "state": {parameter name (model.named_parameters order): {"exp_avg": t, "exp_avg_sq": t} | {"square_avg": t}}}

`preconditioner(state)` gives, per parameter name, the factor P the run's optimizer applies to a FRESH
gradient entering at the next step, to first order (see its docstring for the approximation).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from ldpipe.atomic import write_bytes
from ldpipe.errors import LdpipeError

STATE_FILE = "optimizer_state.pt"
FORMAT = 1
_KINDS = {"AdamW": "adamw", "Adam": "adam", "RMSprop": "rmsprop"}


def _plain(v):
    if isinstance(v, bool) or isinstance(v, (int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
        return [float(x) for x in v]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return None


def save_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> Path:
    """Write `<ckpt_dir>/optimizer_state.pt` atomically (temp file + rename) for the parameters of `model`.

    The optimizer must wrap `model`'s parameters (as train.py's does); state is keyed by parameter name.
    A fresh optimizer (no step yet) is saved with step 0 and no per-parameter state.
    """
    kind = _KINDS.get(type(optimizer).__name__)
    if kind is None:
        raise LdpipeError(f"save_optimizer_state: unsupported optimizer {type(optimizer).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    state, step = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            if id(p) not in names:
                raise LdpipeError("save_optimizer_state: the optimizer holds a parameter the model does not name")
            step = max(step, int(float(st.get("step", 0))))
            state[names[id(p)]] = {k: v.detach().to("cpu").clone() for k, v in st.items()
                                   if k != "step" and isinstance(v, torch.Tensor)}
    g0 = optimizer.param_groups[0]
    hyper = {k: _plain(v) for k, v in g0.items() if k != "params" and _plain(v) is not None}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "optimizer": kind, "step": step, "hyper": hyper, "state": state}, buf)
    return write_bytes(buf.getvalue(), Path(ckpt_dir) / STATE_FILE)


def load_optimizer_state(ckpt_dir: Path | str) -> dict | None:
    """The saved state of a checkpoint directory, or None when it has none (an older run, or the base model)."""
    f = Path(ckpt_dir) / STATE_FILE
    if not f.is_file():
        return None
    try:
        st = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which
        raise LdpipeError(f"{f}: not a readable optimizer state ({e})") from e
    if not isinstance(st, dict) or st.get("format") != FORMAT or st.get("optimizer") not in _KINDS.values():
        raise LdpipeError(f"{f}: unknown optimizer-state format (want format {FORMAT} with optimizer "
                          f"adamw/adam/rmsprop)")
    return st


def preconditioner(st: dict, model: torch.nn.Module | None = None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(P per parameter name, reason): the first-order factor of the NEXT step on a fresh gradient g.

    The approximation is the derivative at g = 0 of the next update with respect to one example's
    gradient, state (m, v, t) loaded: the immediate effect of the example on the next update, ignoring
    its later carry-over through the momentum m and its own (second-order, g^2) effect on v. So
      Adam(W):  update = lr * m_hat / (sqrt(v_hat) + eps), m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2
                P = (1-b1)/(1-b1^(t+1)) / (sqrt(b2 v / (1-b2^(t+1))) + eps)
      RMSprop:  P = 1 / (sqrt(alpha v) + eps)   (no momentum, not centered)
    The zero-gradient part of the step (momentum drift b1 m, weight decay) does not depend on the
    example and is left out. None (with the reason) where no linearisation exists: a fresh optimizer
    (t = 0: Adam's first step is lr g/(|g|+eps), ~lr sign(g)), amsgrad, RMSprop with momentum/centered,
    or a parameter of `model` the state does not cover.
    """
    t, kind, h = int(st["step"]), st["optimizer"], st["hyper"]
    if t == 0 or not st["state"]:
        return None, f"{kind} had taken no step (fresh state): no first-order preconditioner, SGD direction used"
    eps = float(h.get("eps", 1e-8))
    out: dict[str, torch.Tensor] = {}
    if kind in ("adam", "adamw"):
        if h.get("amsgrad"):
            return None, "amsgrad: not supported, SGD direction used"
        b1, b2 = (float(b) for b in h.get("betas", (0.9, 0.999)))
        coef = (1 - b1) / (1 - b1 ** (t + 1))
        for n, s in st["state"].items():
            v_hat = b2 * s["exp_avg_sq"].double() / (1 - b2 ** (t + 1))
            out[n] = (coef / (v_hat.sqrt() + eps)).float()
    else:
        if h.get("momentum") or h.get("centered"):
            return None, "RMSprop with momentum or centered: not supported, SGD direction used"
        a = float(h.get("alpha", 0.99))
        for n, s in st["state"].items():
            out[n] = (1.0 / ((a * s["square_avg"].double()).sqrt() + eps)).float()
    if model is not None:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in out]
        if missing:
            return None, f"optimizer state lacks parameter(s) {missing[:3]}: SGD direction used"
    return out, f"{kind} state at step {t}"


def untouched(st: dict) -> dict[str, torch.Tensor]:
    """Per parameter, the coordinates the optimizer has never updated (second moment exactly 0: no gradient
    reached them yet, e.g. embedding rows of tokens not seen in any batch)."""
    key = "exp_avg_sq" if st["optimizer"] in ("adam", "adamw") else "square_avg"
    return {n: s[key] == 0 for n, s in st["state"].items() if key in s}


def load_into(optimizer: torch.optim.Optimizer, model: torch.nn.Module, st: dict) -> torch.optim.Optimizer:
    """Fill a freshly made optimizer over `model`'s parameters with the saved state (a real continuation)."""
    named = dict(model.named_parameters())
    for n, s in st["state"].items():
        if n not in named:
            raise LdpipeError(f"optimizer state names parameter {n!r}, which the model does not have")
        p = named[n]
        optimizer.state[p] = {"step": torch.tensor(float(st["step"])),
                              **{k: v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype).clone()
                                 for k, v in s.items()}}
    return optimizer
