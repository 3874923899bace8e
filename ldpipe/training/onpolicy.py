"""On-policy DPO/IPO: preference pairs sampled from the current policy and ranked by a scorer.

Every optimizer step, for each prompt of the batch: sample `n_samples` replies from the policy as it is now
(seeded by (run seed, step), so a rerun draws the same replies), score them, take chosen = the best and
rejected = the worst (the first of equals), and skip the prompt when best and worst tie. The DPO/IPO loss then
runs on the fresh pairs against a frozen copy of the starting model (the reference), whose log-probs of the
pairs are computed on the spot. Refreshing every step on the batch's own prompts is the purest form: each pair
comes from the very policy it updates.

Scorers: a built-in reward function (ldpipe.training.rewards) or an OpenAI-compatible judge (pointwise 1-10 scores, or
pairwise A/B verdicts in both orders turned into win counts). An unparsable verdict is counted; pairwise it is a tie, pointwise
the sample gets no score (it can be neither chosen nor rejected).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import polars as pl
import torch

from ldpipe.model.generate import GenerationConfig, generate
from ldpipe.model.scoring import batch_logps, encode_pair, encode_preference
from ldpipe.spec import OnPolicySpec, RunSpec, ScorerSpec
from ldpipe.training.losses import dpo_loss, ipo_loss
from ldpipe.training.rewards import Reward, RewardContext, make_reward

Ids = list[int]
Scores = list[list[float | None]]   # per prompt, per sample; None: no usable score

# One row per prompt per step: what was sampled and which pair (if any) trained.
ONPOLICY_PAIRS_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.Int64,
    "prompt_index": pl.Int64,     # index into the objective's prompts
    "prompt": pl.String,
    "chosen": pl.String,          # null when tied
    "rejected": pl.String,
    "chosen_score": pl.Float64,
    "rejected_score": pl.Float64,
    "score_mean": pl.Float64,     # over the prompt's scored samples
    "tied": pl.Boolean,
}


class Scorer(Protocol):
    def score(self, prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> Scores: ...


@dataclass
class RewardScorer:
    reward: Reward

    def score(self, prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> Scores:
        batch = getattr(self.reward, "score_batch", None)
        if batch is None:
            return [[float(self.reward(p, y)) for y in ys] for p, ys in zip(prompts, samples)]
        it = iter(batch([p for p, ys in zip(prompts, samples) for _ in ys], [y for ys in samples for y in ys]))
        return [[next(it) for _ in ys] for ys in samples]


POINTWISE_PROMPT = (
    "You are grading a reply of an AI assistant to the conversation below. A good reply is {criteria}.\n\n"
    "Conversation:\n{prompt}\n\nReply to grade:\n{response}\n\n"
    "Rate the reply from 1 (very bad) to 10 (excellent). Answer with the number only.")
PAIRWISE_PROMPT = (
    "You are comparing two replies of an AI assistant to the conversation below. A good reply is {criteria}.\n\n"
    "Conversation:\n{prompt}\n\nReply A:\n{a}\n\nReply B:\n{b}\n\n"
    "Which reply is better? Answer with the single letter A or B only.")
_SCORE = re.compile(r"^\W*(?:score|rating)?\W*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\W*$", re.I)
_VERDICT = re.compile(r"^\W*(?:reply\s+)?([AB])\W*$", re.I)


def parse_score(text: str) -> float | None:
    """A 1-10 rating ("7", "Score: 7", "7/10"), else None."""
    m = _SCORE.match(text.strip())
    return float(m.group(1)) if m and 1 <= float(m.group(1)) <= 10 else None


def parse_verdict(text: str) -> str | None:
    """"A" or "B" ("B", "Reply A.", "a"), else None."""
    m = _VERDICT.match(text.strip())
    return m.group(1).upper() if m else None


@dataclass
class JudgeScorer:
    """Scores samples with an LLM through ldpipe.llm (cached, retried); `unparsable` counts bad verdicts."""
    config: object                 # ldpipe.llm.LLMConfig
    mode: str = "pointwise"
    criteria: str = "helpful, correct and relevant to the conversation"
    environ: dict | None = None
    requests: int = 0
    unparsable: int = 0

    def _ask(self, items: list[tuple[str, str]]) -> list[str]:
        from ldpipe.llm import ChatRequest, LLMClient

        if not items:
            return []
        with LLMClient(self.config, environ=self.environ) as client:
            out = client.complete_many([ChatRequest.chat(name, text) for name, text in items])
        self.requests += len(items)
        return [c.text for c in out]

    def score(self, prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> Scores:
        if self.mode == "pairwise":
            return self._pairwise(prompts, samples)
        items = [(f"judge/p{i}/s{j}", POINTWISE_PROMPT.format(criteria=self.criteria, prompt=p.strip(),
                                                              response=y.strip()))
                 for i, (p, ys) in enumerate(zip(prompts, samples)) for j, y in enumerate(ys)]
        flat = [parse_score(t) for t in self._ask(items)]
        self.unparsable += sum(s is None for s in flat)
        it = iter(flat)
        return [[next(it) for _ in ys] for ys in samples]

    def _pairwise(self, prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> Scores:
        """Every pair of a prompt's samples in both A/B orders, so a judge's position bias cancels; a sample's
        score is its wins (half a win per order won; a tie or an unparsable verdict gives each side a quarter)."""
        pairs = [(i, j, k) for i, ys in enumerate(samples) for j in range(len(ys)) for k in range(len(ys)) if j != k]
        items = [(f"judge/p{i}/s{j}-s{k}", PAIRWISE_PROMPT.format(criteria=self.criteria, prompt=prompts[i].strip(),
                                                                  a=samples[i][j].strip(), b=samples[i][k].strip()))
                 for i, j, k in pairs]
        scores: Scores = [[0.0] * len(ys) for ys in samples]
        for (i, j, k), text in zip(pairs, self._ask(items)):
            verdict = parse_verdict(text)
            self.unparsable += verdict is None
            scores[i][j] += {"A": 0.5, "B": 0.0}.get(verdict, 0.25)
            scores[i][k] += {"A": 0.0, "B": 0.5}.get(verdict, 0.25)
        return scores


def make_scorer(spec: ScorerSpec, context: RewardContext, *, cache_path=None,
                environ: dict | None = None) -> Scorer:
    if spec.kind == "reward":
        return RewardScorer(make_reward(spec.name, context))
    from ldpipe.llm import LLMConfig

    cfg = LLMConfig.from_spec(spec, cache_path=cache_path, system_message="You are a careful, impartial judge.")
    return JudgeScorer(cfg, mode=spec.mode, criteria=spec.criteria, environ=environ)


def select_pair(samples: Sequence[str], scores: Sequence[float | None]) -> tuple[int, int] | None:
    """(chosen index, rejected index): the first best and the first worst scored sample; None on a tie."""
    scored = [(s, j) for j, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda t: (t[0], -t[1]))
    worst = min(scored, key=lambda t: (t[0], t[1]))
    if best[0] == worst[0] or samples[best[1]] == samples[worst[1]]:
        return None
    return best[1], worst[1]


def sampling_seed(run_seed: int, step: int) -> int:
    return (run_seed * 1_000_033 + step) % (2 ** 31)


@dataclass
class OnPolicyObjective:
    """The train.Objective of on-policy DPO/IPO; `step` counts the loss calls (optimizer steps) so far and
    seeds the sampling (set it when resuming from a checkpoint)."""
    prompts: list[str]
    tokenizer: object
    algo: str
    beta: float
    settings: OnPolicySpec
    scorer: Scorer
    seed: int = 0
    label_smoothing: float = 0.0
    max_prompt_tokens: int = 96
    max_response_tokens: int = 64
    chat_template: str = "auto"
    step: int = 0
    ref_model: torch.nn.Module | None = None
    device: torch.device | None = None
    _pending_ref: dict | None = None    # reference weights from a resume checkpoint, applied on the next loss
    history: list[dict] = field(default_factory=list)   # ONPOLICY_PAIRS_SCHEMA rows

    @property
    def n(self) -> int:
        return len(self.prompts)

    def prepare(self, model, first_epoch: list[list[int]], dev: torch.device) -> None:
        # The reference is the starting model, frozen; on-policy pairs do not exist yet, so nothing is precomputed.
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.device = dev

    # Resume checkpoints (ldpipe.training.resume) keep the step (it seeds the sampling) and the reference's weights: a
    # resumed run loads the policy's later weights, so the starting model is gone by then.
    def state_dict(self) -> dict:
        if self.ref_model is None:
            raise RuntimeError("OnPolicyObjective.prepare must run before its state is saved")
        return {"step": self.step, "ref_model": self.ref_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self._pending_ref = state["ref_model"]
        self.ref_model = None

    def _ensure_ref(self, model, dev: torch.device) -> None:
        """After load_state_dict: the reference is a copy of the policy's architecture with the saved weights."""
        if self.ref_model is None and self._pending_ref is not None:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            self.ref_model.load_state_dict(self._pending_ref)
            self._pending_ref, self.device = None, dev

    @torch.no_grad()
    def ref_logp_mean(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Mean per-token log pi_ref(response | prompt), EOS included (the `ref_logp_mean` reward)."""
        if self.ref_model is None:
            raise RuntimeError("OnPolicyObjective.prepare must run before scoring with the reference")
        logp, n_tok = batch_logps(self.ref_model, [self._enc(p, y) for p, y in zip(prompts, responses)],
                                  device=self.device)
        return (logp / n_tok).tolist()

    def sample(self, model, prompts: Sequence[str], dev: torch.device) -> list[list[str]]:
        """`n_samples` replies per prompt from `model`, with the leading space the dataset's responses have."""
        s, n = self.settings, self.settings.n_samples
        cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature,
                               top_p=s.top_p, seed=sampling_seed(self.seed, self.step), batch_size=len(prompts) * n,
                               max_prompt_tokens=self.max_prompt_tokens, chat_template=self.chat_template)
        flat = generate(model, self.tokenizer, [p for p in prompts for _ in range(n)], cfg, device=dev)
        flat = [" " + y if y else y for y in flat]
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def loss(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, dict[str, float | None]]:
        self._ensure_ref(model, dev)
        if self.ref_model is None:
            raise RuntimeError("OnPolicyObjective.prepare must run before training")
        from ldpipe.training.losses import STAT_COLUMNS as _STAT_COLUMNS

        self.step += 1
        prompts = [self.prompts[i] for i in idx]
        samples = self.sample(model, prompts, dev)
        scores = self.scorer.score(prompts, samples)
        triples: list[tuple[Ids, Ids, Ids]] = []
        for i, p, ys, ss in zip(idx, prompts, samples, scores):
            pick = select_pair(ys, ss)
            valid = [s for s in ss if s is not None]
            row = {"step": self.step, "prompt_index": i, "prompt": p, "chosen": None, "rejected": None,
                   "chosen_score": None, "rejected_score": None,
                   "score_mean": sum(valid) / len(valid) if valid else None, "tied": pick is None}
            if pick is not None:
                c, r = pick
                row.update(chosen=ys[c], rejected=ys[r], chosen_score=ss[c], rejected_score=ss[r])
                triples.append(encode_preference(self.tokenizer, p, ys[c], ys[r], chat_template=self.chat_template,
                                                 max_prompt_tokens=self.max_prompt_tokens,
                                                 max_response_tokens=self.max_response_tokens))
            self.history.append(row)
        valid = [s for ss in scores for s in ss if s is not None]
        stats: dict[str, float | None] = {
            "onpolicy_score_mean": sum(valid) / len(valid) if valid else None,
            "onpolicy_tied_share": 1.0 - len(triples) / len(idx)}
        if not triples:   # every prompt tied: nothing to prefer; a zero loss that still reaches every parameter
            zero = sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros((), device=dev))
            return zero, {**stats, **{col: None for col in _STAT_COLUMNS.values()}}
        pol_c, pol_r = self._logps(model, triples, dev)
        with torch.no_grad():
            ref_c, ref_r = self._logps(self.ref_model, triples, dev)
        if self.algo == "ipo":
            loss, pstats = ipo_loss(pol_c, pol_r, ref_c, ref_r, self.beta)
        else:
            loss, pstats = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.beta, self.label_smoothing)
        return loss, {**stats, **{_STAT_COLUMNS[k]: float(v) for k, v in pstats.items()}}

    def _enc(self, prompt: str, response: str) -> tuple[Ids, Ids]:
        return encode_pair(self.tokenizer, prompt, response, max_prompt_tokens=self.max_prompt_tokens,
                           max_response_tokens=self.max_response_tokens, chat_template=self.chat_template)

    @staticmethod
    def _logps(model, triples: list[tuple[Ids, Ids, Ids]], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # chosen and rejected in one forward, as the off-policy objective does
        logp, _ = batch_logps(model, [(p, c) for p, c, _ in triples] + [(p, r) for p, _, r in triples], device=dev)
        return logp[: len(triples)], logp[len(triples):]

    def pairs_frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.history, schema=ONPOLICY_PAIRS_SCHEMA)


def make_onpolicy_objective(run: RunSpec, tokenizer, examples: Sequence[tuple[str, ...]], *,
                            max_prompt_tokens: int, max_response_tokens: int, chat_template: str = "auto",
                            cache_path=None) -> OnPolicyObjective:
    """The prompts of `examples` (first element of each tuple; repeats dropped, order kept) with the run's
    on-policy settings. A judge caches its verdicts in the ldpipe home (llm_cache.sqlite) unless told otherwise."""
    if run.pairs != "on_policy":
        raise ValueError(f"run {run.name!r}: pairs is {run.pairs!r}, not 'on_policy'")
    prompts = list(dict.fromkeys(e[0] for e in examples))
    if not prompts:
        raise ValueError(f"run {run.name!r}: no training prompts")
    settings = run.on_policy_settings
    if settings.scorer.kind == "judge" and cache_path is None:
        from ldpipe.paths import Paths

        cache_path = Paths.default().llm_cache   # a caller with its own home passes its cache (train_run does)
    if max_response_tokens <= settings.max_new_tokens:
        # the scored text must be the trained text: a sample cut by max_response_tokens would be a different reply
        raise ValueError(f"run {run.name!r}: on_policy.max_new_tokens ({settings.max_new_tokens}) must be below "
                         f"probes.max_response_tokens ({max_response_tokens}), which also caps training responses")
    objective = OnPolicyObjective(prompts, tokenizer, algo=run.algo, beta=run.beta, settings=settings,
                                  scorer=RewardScorer(lambda p, y: 0.0), seed=run.seed,
                                  label_smoothing=run.label_smoothing, max_prompt_tokens=max_prompt_tokens,
                                  max_response_tokens=max_response_tokens, chat_template=chat_template)
    # the scorer may use the objective's frozen reference (reward ref_logp_mean), which exists after prepare()
    objective.scorer = make_scorer(settings.scorer, RewardContext(list(examples), objective.ref_logp_mean),
                                   cache_path=cache_path)
    return objective


__all__ = ["ONPOLICY_PAIRS_SCHEMA", "JudgeScorer", "OnPolicyObjective", "RewardScorer", "Scorer",
           "make_onpolicy_objective", "make_scorer", "parse_score", "parse_verdict", "sampling_seed", "select_pair"]
