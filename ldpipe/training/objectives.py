"""What a run's optimizer steps on: the SFT and preference (DPO/IPO/cDPO) objectives over encoded examples, and
make_objective, which picks the declared one (on-policy pairs: ldpipe.training.onpolicy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ldpipe.model.scoring import batch_logps, encode_pair, encode_preference
from ldpipe.spec import RunSpec
from ldpipe.training.losses import STAT_COLUMNS as _STAT_COLUMNS
from ldpipe.training.losses import dpo_loss, ipo_loss, sft_loss

Ids = list[int]


# ------------------------------------------------------------------ objectives

class _LogpsModule(torch.nn.Module):
    """batch_logps as a module's forward, so DistributedDataParallel can wrap it: DDP only syncs the
    gradients of a backward whose forward went through the wrapper."""

    def __init__(self, model, dev: torch.device):
        super().__init__()
        self.lm, self.dev = model, dev

    def forward(self, pairs: list[tuple[Ids, Ids]]) -> torch.Tensor:
        return batch_logps(self.lm, pairs, device=self.dev)[0]


def _logps(model, pairs: list[tuple[Ids, Ids]], dev: torch.device) -> torch.Tensor:
    """Summed response log-probs; `model` is the causal LM, or (data-parallel training) its DDP wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model(pairs)
    return batch_logps(model, pairs, device=dev)[0]


class Objective(Protocol):
    n: int

    def prepare(self, model, first_epoch: list[list[int]], dev: torch.device) -> None: ...

    def loss(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class SftObjective:
    """Summed NLL of (prompt, response) pairs."""
    pairs: list[tuple[Ids, Ids]]

    @property
    def n(self) -> int:
        return len(self.pairs)

    def prepare(self, model, first_epoch: list[list[int]], dev: torch.device) -> None:
        pass

    def loss(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        logp = _logps(model, [self.pairs[i] for i in idx], dev)
        return sft_loss(logp), {}


@dataclass
class PreferenceObjective:
    """Off-policy DPO/IPO on (prompt, chosen, rejected); the reference is the model at `prepare` time."""
    triples: list[tuple[Ids, Ids, Ids]]
    algo: str
    beta: float
    label_smoothing: float = 0.0
    ref: torch.Tensor | None = None   # [n, 2]: reference log pi of chosen, rejected

    @property
    def n(self) -> int:
        return len(self.triples)

    def _logps(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [(self.triples[i][0], self.triples[i][1]) for i in idx]
        rejected = [(self.triples[i][0], self.triples[i][2]) for i in idx]
        logp = _logps(model, chosen + rejected, dev)
        return logp[: len(idx)], logp[len(idx):]

    @torch.no_grad()
    def prepare(self, model, first_epoch: list[list[int]], dev: torch.device) -> None:
        # Same batches, same forward as step 1 of training: identical numbers, so rewards start at exactly 0.
        ref = torch.full((self.n, 2), float("nan"), device=dev)
        for idx in first_epoch:
            c, r = self._logps(model, idx, dev)
            ref[idx, 0], ref[idx, 1] = c, r
        if torch.isnan(ref).any():
            raise RuntimeError("reference log-probs missing for some pairs: first_epoch must cover every pair")
        self.ref = ref

    # Optional Objective methods: state a resume checkpoint keeps (an objective without them is `prepare`d
    # again on the starting model when a run resumes).
    def state_dict(self) -> dict:
        return {"ref": self.ref}

    def load_state_dict(self, state: dict) -> None:
        self.ref = state["ref"]

    def loss(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ref is None:
            raise RuntimeError("PreferenceObjective.prepare must run before training")
        c, r = self._logps(model, idx, dev)
        rc, rr = self.ref[idx, 0], self.ref[idx, 1]
        if self.algo == "ipo":
            loss, stats = ipo_loss(c, r, rc, rr, self.beta)
        else:
            loss, stats = dpo_loss(c, r, rc, rr, self.beta, self.label_smoothing)
        return loss, {_STAT_COLUMNS[k]: float(v) for k, v in stats.items()}


def make_objective(run: RunSpec, tokenizer, examples: Sequence[tuple[str, ...]], *, max_prompt_tokens: int,
                   max_response_tokens: int, chat_template: str = "auto",
                   llm_cache: Path | None = None) -> SftObjective | PreferenceObjective:
    """SFT takes (prompt, response) examples, DPO/IPO (prompt, chosen, rejected). `llm_cache`: where an on-policy
    judge caches its verdicts (the run's ldpipe home)."""
    if run.pairs == "on_policy":   # only the prompts are used: pairs are sampled from the policy every step
        from ldpipe.training.onpolicy import make_onpolicy_objective

        return make_onpolicy_objective(run, tokenizer, examples, max_prompt_tokens=max_prompt_tokens,
                                       max_response_tokens=max_response_tokens, chat_template=chat_template,
                                       cache_path=llm_cache)
    width = 2 if run.algo == "sft" else 3
    bad = next((i for i, e in enumerate(examples) if len(e) != width), None)
    if bad is not None:
        raise ValueError(f"{run.algo} needs {width}-tuples of text; example {bad} has {len(examples[bad])}")

    def enc(prompt: str, response: str) -> tuple[Ids, Ids]:
        return encode_pair(tokenizer, prompt, response, max_prompt_tokens=max_prompt_tokens,
                           max_response_tokens=max_response_tokens, chat_template=chat_template)

    if run.algo == "sft":
        return SftObjective([enc(p, y) for p, y in examples])
    # both responses cut after the same prompt tokens, as TRL cuts a pair (encode_preference)
    triples = [encode_preference(tokenizer, p, yc, yr, max_prompt_tokens=max_prompt_tokens,
                                 max_response_tokens=max_response_tokens, chat_template=chat_template)
               for p, yc, yr in examples]
    return PreferenceObjective(triples, algo=run.algo, beta=run.beta, label_smoothing=run.label_smoothing)
