"""The squeezing toy of the paper (docs/glossary.md#squeezing): one gradient step on a softmax
(multi-class logistic regression) head, z = x^T W, pi = softmax(z).

The step is W1 = W0 + eta_minus * outer(pi - e_minus, x)^T - eta_plus * outer(pi - e_plus, x)^T:
a negative gradient (gradient ASCENT on -log pi(minus)) and/or a positive one. Because
Delta z = x^T Delta W = ||x||^2 * (eta_minus (pi - e_minus) - eta_plus (pi - e_plus)), a pure
negative step raises every other logit in proportion to its probability pi_k and lowers the
pushed-down one by (1 - pi_minus): after renormalisation only already-likely classes gain.

Random draws follow the reference notebook's order from one legacy numpy stream seeded 10086
(x, W_uniform, W_flat, the peaky draw, then panel E's x and W), so seed 10086 gives its panels.
"""
from __future__ import annotations

import numpy as np

from ldpipe.analysis.plots import figure_png, subplots

K = 50  # classes
I = 4   # input dimension
_PEAK_CLASSES = list(range(5, 13))  # multi-hot target of the one-step "peaky" initialisation

# panel -> (initial W, pushed-down class, eta_minus, pushed-up class, eta_plus).
# D is the toy's setting D (the reference notebook's later version). With eta_minus == eta_plus on the same x the
# pi terms of the two gradients cancel, Delta z = eta ||x||^2 (e_25 - e_42), so D shows the positive
# push alone and y* does not gain. D0 is the notebook's earlier D (negative gradient only), the
# panel that shows squeezing from a valley.
PANELS: dict[str, tuple[str, int | None, float, int | None, float]] = {
    "A": ("uniform", None, 0.0, 21, 0.5),
    "B": ("flat", 42, 0.3, None, 0.0),
    "C": ("peaky", 11, 0.5, None, 0.0),
    "D": ("peaky", 42, 0.5, 25, 0.5),
    "D0": ("peaky", 42, 0.5, None, 0.0),
    "E": ("large", 100, 1.0, None, 0.0),
}
_DESCRIPTION = {
    "A": "uniform W0, positive gradient on class 21",
    "B": "flat W0, negative gradient on class 42",
    "C": "peaky W0, negative gradient on the peak class 11",
    "D": "peaky W0, negative gradient on valley class 42 + positive on 25",
    "D0": "peaky W0, negative gradient on valley class 42 only",
    "E": "x in R^50, 1000 classes, negative gradient on class 100",
}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _onehot(n: int, k: int | None) -> np.ndarray:
    v = np.zeros(n)
    if k is not None:
        v[k] = 1.0
    return v


def _initial_weights(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """All initial weights in the notebook's draw order; returns (W by name, x for A-D, x for E)."""
    rs = np.random.RandomState(seed)
    x = rs.randn(I, 1)
    w_uniform = rs.randn(I, K)
    w_flat = np.ones((I, K)) + rs.randn(I, K) * 0.05
    # "peaky": one GD step (lr 1) from a random W toward the multi-hot label on classes 5..12
    w = rs.randn(I, K)
    y = np.zeros(K)
    y[_PEAK_CLASSES] = 1.0
    w_peaky = w - np.outer(softmax((x.T @ w)[0]) - y, x[:, 0]).T
    x_large = rs.randn(50, 1)
    w_large = rs.randn(50, 1000) * 0.5
    return {"uniform": w_uniform, "flat": w_flat, "peaky": w_peaky, "large": w_large}, x, x_large


def run_panel(kind: str, seed: int = 10086) -> dict:
    """One panel: pi0, pi1, logits, the pushed classes, y*, Delta pi and the squeezing summary.

    y* is the argmax of pi0 over every class except the pushed-down one. Summary fields:
    minus_falls (pi(ybar) falls; None without a negative gradient), star_rises,
    frac_others_fall (over classes other than ybar, y*, y+), only_argmax_rises (every class
    except y* and the positively pushed one falls).
    """
    if kind not in PANELS:
        raise ValueError(f"unknown panel {kind!r}; choose one of {sorted(PANELS)}")
    init, minus, eta_minus, plus, eta_plus = PANELS[kind]
    weights, x, x_large = _initial_weights(seed)
    w0 = weights[init]
    xv = (x_large if init == "large" else x)[:, 0]
    n = w0.shape[1]
    z0 = xv @ w0
    pi0 = softmax(z0)
    w1 = (w0 + eta_minus * np.outer(pi0 - _onehot(n, minus), xv).T
          - eta_plus * np.outer(pi0 - _onehot(n, plus), xv).T)
    z1 = xv @ w1
    pi1 = softmax(z1)
    delta = pi1 - pi0

    masked = pi0.copy()
    if minus is not None:
        masked[minus] = -np.inf
    star = int(np.argmax(masked))
    special = {c for c in (minus, star, plus) if c is not None}
    others = np.array([k for k in range(n) if k not in special])
    not_rich = np.array([k for k in range(n) if k not in {star, plus}])
    return {
        "panel": kind,
        "description": _DESCRIPTION[kind],
        "n_classes": n,
        "pi0": pi0,
        "pi1": pi1,
        "z0": z0,
        "z1": z1,
        "x_norm_sq": float(xv @ xv),
        "eta_minus": eta_minus,
        "eta_plus": eta_plus,
        "minus_class": minus,
        "plus_class": plus,
        "y_star": star,
        "delta_pi": delta,
        "delta_pi_star": float(delta[star]),
        "delta_pi_minus": float(delta[minus]) if minus is not None else None,
        "minus_falls": bool(delta[minus] < 0) if minus is not None else None,
        "star_rises": bool(delta[star] > 0),
        "frac_others_fall": float((delta[others] < 0).mean()),
        "only_argmax_rises": bool((delta[not_rich] < 0).all()),
        "n_rise": int((delta > 0).sum()),
    }


_SCALARS = ("panel", "description", "n_classes", "minus_class", "plus_class", "y_star", "eta_minus", "eta_plus",
            "delta_pi_star", "delta_pi_minus", "minus_falls", "star_rises", "frac_others_fall",
            "only_argmax_rises", "n_rise")


def summary_row(r: dict) -> dict:
    """The scalar fields of one panel's result (for an asset check or a table), plus pi0/pi1 of y* and ybar."""
    row = {k: r[k] for k in _SCALARS}
    row["pi0_star"] = float(r["pi0"][r["y_star"]])
    row["pi1_star"] = float(r["pi1"][r["y_star"]])
    row["pi0_minus"] = float(r["pi0"][r["minus_class"]]) if r["minus_class"] is not None else None
    return row


def summary(seed: int = 10086) -> list[dict]:
    """`summary_row` of every panel."""
    return [summary_row(run_panel(kind, seed)) for kind in PANELS]


def plot_panel(result: dict) -> bytes:
    """PNG bytes: pi1 against pi0 on log-log axes, the diagonal, and the pushed classes and y* marked."""
    pi0, pi1 = result["pi0"], result["pi1"]
    fig, ax = subplots(figsize=(5, 5))
    ax.scatter(pi0, pi1, s=12, color="tab:gray", label="other classes")
    lo = min(pi0.min(), pi1.min()) * 0.5
    ax.plot([lo, 1], [lo, 1], color="black", linewidth=0.6)
    marks = [("minus_class", "tab:red", "pushed down ȳ"), ("plus_class", "tab:blue", "pushed up y⁺"),
             ("y_star", "tab:green", "argmax y*")]
    for key, colour, label in marks:
        k = result[key]
        if k is not None:
            ax.scatter([pi0[k]], [pi1[k]], s=60, color=colour, label=f"{label} ({k})", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("π before the step")
    ax.set_ylabel("π after the step")
    ax.set_title(f"Panel {result['panel']}\n{result['description']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return figure_png(fig)
