"""Training losses on per-sequence SUMMED log-probabilities (tensors of shape [B]).

Conventions follow the paper's code, which derives from the DPO reference
implementation (docs/glossary.md#metrics):
- log pi(y|x) is summed over response tokens, never length-normalised. This holds
  for IPO too (TRL's IPO averages over tokens; the DPO codebase and this module do not).
- The preference "logit" is the reference-adjusted margin
      m = (pol_c - ref_c) - (pol_r - ref_r)
  and the implicit rewards are beta * (pol - ref), as logged by TRL.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PreferenceStats = dict[str, torch.Tensor]
# the TRL-style names of reward_stats -> the train_metrics columns that hold them (ldpipe.schema)
STAT_COLUMNS = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                "rewards/accuracies": "rewards_accuracy", "rewards/margins": "rewards_margin"}
REWARD_COLUMNS = tuple(STAT_COLUMNS.values())


def sft_loss(logp: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the summed NLL -log pi(y|x)."""
    return -logp.mean()


def preference_margin(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor,
                      ref_r: torch.Tensor) -> torch.Tensor:
    """m = (pol_c - ref_c) - (pol_r - ref_r), per pair."""
    return (pol_c - ref_c) - (pol_r - ref_r)


def reward_stats(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                 beta: float) -> PreferenceStats:
    """TRL-style batch means (detached): rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins."""
    with torch.no_grad():
        rc = beta * (pol_c - ref_c)
        rr = beta * (pol_r - ref_r)
        return {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (rc > rr).float().mean(),  # strict: a tie (e.g. step 0) is not a win
            "rewards/margins": (rc - rr).mean(),
        }


def dpo_loss(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, PreferenceStats]:
    """Sigmoid DPO loss, batch mean; label_smoothing eps > 0 gives cDPO:
    -(1-eps) log sigma(beta m) - eps log sigma(-beta m)."""
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * preference_margin(pol_c, pol_r, ref_c, ref_r)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-z)
    return losses.mean(), reward_stats(pol_c, pol_r, ref_c, ref_r, beta)


def ipo_loss(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, PreferenceStats]:
    """IPO (Azar et al., eq. 17, as in the DPO codebase): (m - 1/(2 beta))^2, batch mean.
    Its minimum is at margin m = 1/(2 beta) nats (5 nats at beta 0.1), not at infinity."""
    _check_beta(beta)
    m = preference_margin(pol_c, pol_r, ref_c, ref_r)
    losses = (m - 1.0 / (2.0 * beta)) ** 2
    return losses.mean(), reward_stats(pol_c, pol_r, ref_c, ref_r, beta)


def preference_coefficient(margin, beta: float, *, algo: str = "dpo", label_smoothing: float = 0.0):
    """-dL/dm of one pair's loss at reference-adjusted margin m: the weight c of the update c * (g+ - g-).

    This module's losses are the formulas' only home; the influence updates and the heat map call this.
      DPO / cDPO (eps): b * ((1 - eps) * s(-b m) - eps * s(b m))   (eps = 0: b * s(-b m))
      IPO:              1/b - 2 m                                   (negative past the target margin 1/(2b))
    `margin`: a float (returns a float) or a tensor (returns a tensor)."""
    _check_beta(beta)
    if algo == "ipo":
        return 1.0 / beta - 2.0 * margin
    if algo not in ("dpo", "sft"):   # sft: what a DPO update at the run's beta would do (the heat map's DPO column)
        raise ValueError(f"preference_coefficient: algo must be 'dpo' or 'ipo', got {algo!r}")
    exp = torch.exp if isinstance(margin, torch.Tensor) else (lambda v: float(np.exp(v)))
    eps = label_smoothing
    if not eps:
        return beta / (1 + exp(beta * margin))
    return beta * ((1 - eps) / (1 + exp(beta * margin)) - eps / (1 + exp(-beta * margin)))


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
