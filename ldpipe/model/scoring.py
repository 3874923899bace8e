"""Probe log-probabilities: a fast exact scorer, the naive reference, and the training helper.

Tokenization is the model's own (ldpipe.model.encoding, docs/glossary.md#tokenization): its BOS, its chat template
where it has one and `chat_template` is `auto`, TRL's prompt/response boundary, EOS after the response. log pi(y|x)
is the fp32 log-softmax SUMMED over the response tokens (EOS included, prompt excluded).

Truncation: the prompt keeps its LAST `max_prompt_tokens` tokens (HH keeps the
end, where the question is; a leading BOS stays); the response keeps its FIRST
`max_response_tokens - 1` tokens and then gets EOS, so a response is at most
`max_response_tokens` tokens and always ends in EOS. (The reference cuts every
response to fit 512 tokens, which can drop EOS; we keep it so that every
response is a complete sequence.)

Fast path (score_probes): each prompt runs once with a KV cache, the cache is
expanded over that prompt's responses, and all responses run in one
right-padded batch. Several prompts share a forward: they are sorted by length
and left-padded (with attention mask and explicit position ids, so rotary
positions are exact), and a batch holds at most `max_batch_tokens` padded
(prompt + response) tokens. Logits are computed only at real response
positions, from the final hidden states and the output embedding.

Speed: prompts are grouped by length and run once per group; the group's
responses are sorted by length and cut into length buckets (a small dynamic
program trades padding against the fixed cost of a forward), each bucket
running over a row-selected copy of the group's prompt cache. If a forward
runs out of memory, the batch budget is halved and the unfinished responses
are retried, down to one response per forward.

Per-sequence metrics (docs/glossary.md#metrics, over response positions l,
pi_l = softmax at l, y_l = label, V = vocabulary size), all computed from
exp(logits - max) so that nothing underflows to NaN or -inf:
  A_o            sqrt(V * (mean_l ||pi_l||_2)^2 + V - 2), the reference's ||A_o||_F
  p_e            mean_l ||pi_l - e_{y_l}||_2
  energy         mean_l (1 - pi_l(y_l))
  except_argmax  sum_l log(1 - max_v pi_l(v)), as the log of the summed non-argmax
                 probabilities (-inf only if a position puts all mass on one token)
  argmax_match   #{l : y_l = argmax_v pi_l(v)}, the positions where the response IS the teacher-forced
                 argmax path y* (argmax_logp_sum - logp_sum sums the gap over the other positions)

One file on purpose (longer than ldpipe's ~400-line rule): the fast scorer, the naive reference it is tested
against and the training helper share the truncation and encoding rules, and their equality is the contract.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import polars as pl
import torch
import torch.nn.functional as F

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.model.encoding import ChatTemplate, check_limits, encode_responses, uses_chat_template
from ldpipe.model.lm import attention_without_cudnn, eval_mode
from ldpipe.schema import PROBE_SCHEMA

log = logging.getLogger(__name__)

# Per-sequence metrics of the reference trainer (module docstring), after the log-prob columns.
METRIC_SCHEMA: dict[str, pl.DataType] = {
    "A_o": pl.Float64,
    "p_e": pl.Float64,
    "energy": pl.Float64,
    "except_argmax": pl.Float64,
    "argmax_match": pl.Int64,
}
SCORE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,
    "response_type": pl.String,
    "logp_sum": pl.Float64,
    "n_tokens": pl.Int64,
    "logp_mean": pl.Float64,
    "argmax_logp_sum": pl.Float64,
    **METRIC_SCHEMA,
}

# Positions per lm_head chunk are chosen so one fp32 logits chunk stays near this many elements (~128 MiB).
_LOGIT_CHUNK_ELEMENTS = 1 << 25


@dataclass
class EncodedProbe:
    """One probe prompt with all its responses (token ids)."""
    example_id: str
    prompt_ids: list[int]
    response_types: list[str]
    response_ids: list[list[int]]  # EOS appended, truncated


# --------------------------------------------------------------------------- encoding

def encode_pair(tokenizer, prompt: str, response: str, *, max_prompt_tokens: int = 128,
                max_response_tokens: int = 96, chat_template: ChatTemplate | bool = "auto") -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) by the tokenization contract (ldpipe.model.encoding) and its truncation."""
    chat = uses_chat_template(tokenizer, chat_template)
    return encode_responses(tokenizer, prompt, [response], chat=chat, max_prompt_tokens=max_prompt_tokens,
                            max_response_tokens=max_response_tokens)[0]


def encode_preference(tokenizer, prompt: str, chosen: str, rejected: str, *, max_prompt_tokens: int = 128,
                      max_response_tokens: int = 96, chat_template: ChatTemplate | bool = "auto"
                      ) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids), both responses cut after the same prompt tokens, as TRL's DPOTrainer
    cuts a pair (so prompt + rejected is always the tokenized rejected sequence)."""
    chat = uses_chat_template(tokenizer, chat_template)
    (p, c), (_, r) = encode_responses(tokenizer, prompt, [chosen, rejected], chat=chat,
                                      max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    return p, c, r


def encode_probes(tokenizer, probes: pl.DataFrame, *, max_prompt_tokens: int = 128,
                  max_response_tokens: int = 96, source: str = "probes",
                  chat_template: ChatTemplate | bool = "auto") -> list[EncodedProbe]:
    """Group PROBE_SCHEMA rows by example_id (first-seen order) and tokenize them by the contract; a prompt's
    responses share one cut and so one list of prompt ids (ldpipe.model.encoding.shared_cut)."""
    check_limits(max_prompt_tokens, max_response_tokens)
    missing = [c for c in ("example_id", "response_type", "prompt", "response") if c not in probes.columns]
    if missing:
        raise DataValidationError(source, f"missing column(s) {missing}; expected {list(PROBE_SCHEMA)}")
    chat = uses_chat_template(tokenizer, chat_template)
    rows = probes.select("example_id", "response_type", "prompt", "response").rows()

    order: list[str] = []
    groups: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    seen: set[tuple[str, str]] = set()
    for i, (eid, rtype, prompt, response) in enumerate(rows):
        for field, v in (("example_id", eid), ("response_type", rtype), ("prompt", prompt), ("response", response)):
            if v is None:
                raise DataValidationError(source, "value is null", row=i, field=field)
        if (eid, rtype) in seen:
            raise DataValidationError(source, f"duplicate response_type {rtype!r} for example {eid!r}",
                                      row=i, field="response_type")
        seen.add((eid, rtype))
        if eid not in groups:
            order.append(eid)
            groups[eid] = (prompt, [])
        elif groups[eid][0] != prompt:
            # All responses of a probe must be scored under one prompt.
            raise DataValidationError(source, f"example {eid!r} has a different prompt than its earlier rows",
                                      row=i, field="prompt")
        groups[eid][1].append((rtype, response))

    out: list[EncodedProbe] = []
    for e in order:
        prompt, resp = groups[e]
        try:
            pairs = encode_responses(tokenizer, prompt, [r for _, r in resp], chat=chat,
                                     max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
        except LdpipeError as exc:
            row = next(i for i, r in enumerate(rows) if r[0] == e)
            raise DataValidationError(source, f"example {e!r}: {exc}", row=row, field="prompt") from None
        out.append(EncodedProbe(example_id=e, prompt_ids=pairs[0][0], response_types=[t for t, _ in resp],
                                response_ids=[r for _, r in pairs]))
    return out


def truncation_counts(tokenizer, probes: pl.DataFrame, *, max_prompt_tokens: int, max_response_tokens: int,
                      source: str = "probes", chat_template: ChatTemplate | bool = "auto") -> pl.DataFrame:
    """Per response type, what `encode_probes` with these limits cuts from the probe rows: columns response_type,
    rows, prompts_cut / prompt_tokens_dropped (the prompt keeps its last `max_prompt_tokens` tokens) and
    responses_cut / response_tokens_dropped (the response keeps its first `max_response_tokens - 1`, then EOS)."""
    check_limits(max_prompt_tokens, max_response_tokens)
    full = encode_probes(tokenizer, probes, max_prompt_tokens=sys.maxsize, max_response_tokens=sys.maxsize,
                         source=source, chat_template=chat_template)
    keep_response = max_response_tokens - 1          # EOS is always kept, so it never counts as dropped
    counts: dict[str, list[int]] = {}
    for ep in full:
        p_drop = max(0, len(ep.prompt_ids) - max_prompt_tokens)
        for rtype, r in zip(ep.response_types, ep.response_ids):
            r_drop = max(0, len(r) - 1 - keep_response)
            c = counts.setdefault(rtype, [0, 0, 0, 0, 0])
            c[0] += 1
            c[1] += p_drop > 0
            c[2] += p_drop
            c[3] += r_drop > 0
            c[4] += r_drop
    cols = ("rows", "prompts_cut", "prompt_tokens_dropped", "responses_cut", "response_tokens_dropped")
    return pl.DataFrame([{"response_type": t, "max_prompt_tokens": max_prompt_tokens,
                          "max_response_tokens": max_response_tokens, **dict(zip(cols, c))}
                         for t, c in sorted(counts.items())],
                        schema={"response_type": pl.String, **{c: pl.Int64 for c in cols},
                                "max_prompt_tokens": pl.Int64, "max_response_tokens": pl.Int64})


# --------------------------------------------------------------------------- shared helpers

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _prepare(model, device) -> torch.device:
    if device is None:
        return _model_device(model)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" != the parameters' "cuda:0": no needless model.to
        dev = torch.device("cuda", torch.cuda.current_device())
    if _model_device(model) != dev:
        model.to(dev)
    return dev


def _check_bounds(model, encoded: Sequence[EncodedProbe]) -> None:
    """Clear errors instead of an index error deep in the embedding or silent position overflow."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    vocab = model.get_input_embeddings().num_embeddings
    for ep in encoded:
        if not ep.prompt_ids:
            raise LdpipeError(f"example {ep.example_id!r}: empty prompt")
        if max_pos is not None and len(ep.prompt_ids) >= max_pos:
            raise LdpipeError(f"example {ep.example_id!r}: prompt has {len(ep.prompt_ids)} tokens after truncation, "
                              f"the model takes at most {max_pos} positions; lower max_prompt_tokens")
        for rtype, r in zip(ep.response_types, ep.response_ids):
            if not r:
                raise LdpipeError(f"example {ep.example_id!r}, response {rtype!r}: no tokens (EOS missing)")
            if max_pos is not None and len(ep.prompt_ids) + len(r) > max_pos:
                raise LdpipeError(
                    f"example {ep.example_id!r}, response {rtype!r}: prompt + response = "
                    f"{len(ep.prompt_ids)} + {len(r)} tokens exceed the model's {max_pos} positions")
            bad = max(max(ep.prompt_ids), max(r))
            if bad >= vocab or min(min(ep.prompt_ids), min(r)) < 0:
                raise LdpipeError(f"example {ep.example_id!r}: token id {bad} is outside the model's vocabulary "
                                  f"({vocab}); tokenizer and model do not match")


def _lm_head(model):
    """The output projection, refusing models whose logits are more than lm_head(hidden)."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise LdpipeError(f"{type(model).__name__} post-processes its logits; the fast scorer does not "
                          "support it (use score_naive)")
    head = model.get_output_embeddings()
    if head is None:
        raise LdpipeError(f"{type(model).__name__} has no output embedding; not a causal LM")
    return head


# Per-position statistics, in this order (see _token_stats); per-sequence metrics are reduced from them.
_N_STATS = 7  # log pi(y), log max pi, ||pi||_2, ||pi - e_y||_2, 1 - pi(y), log(1 - max pi), [y is the argmax]


def _token_stats(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per position [n, _N_STATS] fp32 statistics of pi = softmax(head(hidden)), in bounded chunks.

    No statistic is formed by cancellation: with `rest` = the summed non-argmax probabilities (a sum of
    small positive terms, exact in relative terms), log(1 - max pi) = log(rest), 1 - pi(y) = rest when y
    is the argmax, and log Z - max = -log1p(-rest) for peaked rows, -log(max pi) for flat ones. Rows
    where `rest` leaves fp32's normal range (gaps above ~70 nats) are redone in log space, so -inf
    appears only if a position puts all mass on one token.
    """
    # Two [chunk, V] fp32 buffers live at once (logits and pi).
    chunk = max(1, (_LOGIT_CHUNK_ELEMENTS // 2) // _vocab(head))
    out = []
    for i in range(0, hidden.size(0), chunk):
        h, y = hidden[i:i + chunk], labels[i:i + chunk]
        logits = head(h).float()
        pi = torch.softmax(logits, dim=-1)
        am = pi.argmax(dim=-1, keepdim=True)
        z_y = (logits.gather(1, y[:, None]) - logits.gather(1, am)).squeeze(1)  # logit_y - max logit
        del logits
        pi_y = pi.gather(1, y[:, None]).squeeze(1)
        pi_max = pi.gather(1, am).squeeze(1)
        pi.scatter_(1, am, 0.0)
        rest = pi.sum(dim=-1)
        sq_rest = torch.linalg.vector_norm(pi, dim=-1).square()  # sum of squared non-argmax pi
        del pi
        y_max = y == am.squeeze(1)
        # max pi = 1 - rest = 1 / sum_v exp(logit_v - max): take each form where it has no cancellation.
        peaked = rest < 0.5
        p_max = torch.where(peaked, 1.0 - rest, pi_max)
        log_p_max = torch.where(peaked, torch.log1p(-rest), pi_max.log())  # = -(log Z - max logit)
        one_minus_py = torch.where(y_max, rest, 1.0 - pi_y)
        sq_not_y = torch.where(y_max, sq_rest, p_max * p_max + sq_rest - pi_y * pi_y)
        stats = torch.stack([
            z_y + log_p_max,
            log_p_max,
            (p_max * p_max + sq_rest).sqrt(),
            (sq_not_y.clamp(min=0.0) + one_minus_py * one_minus_py).sqrt(),
            one_minus_py,
            rest.log(),
            y_max.float(),
        ], dim=1)
        tiny = rest < 1e-30
        if bool(tiny.any()):
            # The non-argmax probabilities are subnormal or zero in fp32: redo log(1 - max pi) in log space.
            lg = head(h[tiny]).float()
            lse = torch.logsumexp(lg, dim=-1)
            lg.scatter_(1, am[tiny], float("-inf"))
            stats[tiny, 5] = torch.logsumexp(lg, dim=-1) - lse
        out.append(stats)
    if not out:
        return hidden.new_zeros(0, _N_STATS, dtype=torch.float32)
    return torch.cat(out)


def _reduce_stats(stats: torch.Tensor, owner: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Per-sequence float64 sums [n_seq, _N_STATS] (an fp32 sum of ~100 terms near -500 is off by ~1e-4)."""
    return torch.zeros(n_seq, _N_STATS, device=stats.device, dtype=torch.float64).index_add_(0, owner, stats.double())


def _frame(ids: list[str], types: list[str], n: list[int], sums: list[list[float]], vocab: int) -> pl.DataFrame:
    """Rows of SCORE_SCHEMA from per-sequence sums of the _token_stats columns."""
    lp = [r[0] for r in sums]
    a_o = [math.sqrt(vocab * (r[2] / k) ** 2 + vocab - 2) for r, k in zip(sums, n)]
    return pl.DataFrame(
        {
            "example_id": ids,
            "response_type": types,
            "logp_sum": lp,
            "n_tokens": n,
            "logp_mean": [a / b for a, b in zip(lp, n)],
            "argmax_logp_sum": [r[1] for r in sums],
            "A_o": a_o,
            "p_e": [r[3] / k for r, k in zip(sums, n)],
            "energy": [r[4] / k for r, k in zip(sums, n)],
            "except_argmax": [r[5] for r in sums],
            "argmax_match": [round(r[6]) for r in sums],
        },
        schema=SCORE_SCHEMA,
    )


def _vocab(head) -> int:
    return int(head.out_features if hasattr(head, "out_features") else head.weight.shape[0])


# --------------------------------------------------------------------------- fast scorer

# Fixed cost of one forward, in padded-token equivalents: bucketing stops splitting below this.
_FORWARD_COST_TOKENS = 64


@dataclass
class _Group:
    """Prompts that share one prompt forward, and their responses cut into length buckets."""
    probes: list[int]
    chunks: list[list[tuple[int, int]]]  # (probe, response) units, longest first


def _bucket(units: list[tuple[int, int]], lens: dict[tuple[int, int], int], p_max: int, budget: int,
            attn_scale: float) -> list[list[tuple[int, int]]]:
    """Cut one group's responses into contiguous runs of the length-sorted list, minimising
    sum over buckets of (n * longest * (1 + (p_max + longest) / attn_scale) + forward cost),
    with n * (p_max + longest) <= budget (a bucket over budget is split evenly)."""
    units = sorted(units, key=lambda u: -lens[u])
    distinct: list[tuple[int, int]] = []  # (length, count), longest first
    for u in units:
        if distinct and distinct[-1][0] == lens[u]:
            distinct[-1] = (lens[u], distinct[-1][1] + 1)
        else:
            distinct.append((lens[u], 1))
    D = len(distinct)
    best = [0.0] + [math.inf] * D
    cut = [0] * (D + 1)
    for i in range(D):
        L = distinct[i][0]
        per = L * (1.0 + (p_max + L) / attn_scale)
        cap = max(1, budget // (p_max + L))
        n = 0
        for j in range(i + 1, D + 1):
            n += distinct[j - 1][1]
            c = best[i] + n * per + -(-n // cap) * _FORWARD_COST_TOKENS
            if c < best[j]:
                best[j], cut[j] = c, i
    out, start = [], 0
    for i, j in _segments(cut):
        n = sum(c for _, c in distinct[i:j])
        run = units[start:start + n]
        start += n
        pieces = -(-n // max(1, budget // (p_max + distinct[i][0])))
        step = -(-n // pieces)
        out.extend(run[k:k + step] for k in range(0, n, step))
    return out


def _segments(cut: list[int]) -> list[tuple[int, int]]:
    """The segments [i, j) of a dynamic program's best split, in order: cut[j] is where the segment ending at j
    starts, walked back from the end."""
    out, j = [], len(cut) - 1
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def _plan(encoded: Sequence[EncodedProbe], units: Sequence[tuple[int, int]], budget: int,
          attn_scale: float) -> list[_Group]:
    """Prompt groups, then length buckets of each group's responses.

    Groups are contiguous runs of the prompt-length order with group size * longest prompt <= budget,
    chosen (dynamic program) to trade the padding they cause against the fixed cost of a group: a
    short prompt in a group of long ones pads its own forward and every key its responses attend to.
    """
    by_probe: dict[int, list[tuple[int, int]]] = {}
    for u in units:
        by_probe.setdefault(u[0], []).append(u)
    order = sorted(by_probe, key=lambda pi: (len(encoded[pi].prompt_ids), pi))
    lens = {u: len(encoded[u[0]].response_ids[u[1]]) for u in units}
    p_len = [len(encoded[pi].prompt_ids) for pi in order]
    r_tok = [sum(lens[u] for u in by_probe[pi]) for pi in order]
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # group = order[i:j], longest prompt p_len[j - 1]
        pm = p_len[j - 1]
        waste = 0.0
        for i in range(j - 1, -1, -1):
            if j - i > 1 and (j - i) * pm > budget:
                break
            waste += (pm - p_len[i]) * (1.0 + pm / attn_scale + r_tok[i] / attn_scale)
            c = best[i] + waste + 4 * _FORWARD_COST_TOKENS
            if c < best[j]:
                best[j], cut[j] = c, i
    return [_Group(order[i:j], _bucket([u for pi in order[i:j] for u in by_probe[pi]], lens, p_len[j - 1], budget,
                                       attn_scale))
            for i, j in _segments(cut)]


def _prompt_forward(base, encoded: Sequence[EncodedProbe], probes: list[int], dev: torch.device):
    """Left-padded prompts so every prompt's last token sits in the last column."""
    p_lens = torch.tensor([len(encoded[pi].prompt_ids) for pi in probes])
    P = int(p_lens.max())
    p_ids = torch.zeros(len(probes), P, dtype=torch.long)
    for k, pi in enumerate(probes):
        p_ids[k, P - len(encoded[pi].prompt_ids):] = torch.tensor(encoded[pi].prompt_ids)
    p_mask = (torch.arange(P)[None, :] >= (P - p_lens)[:, None]).long()
    p_pos = (torch.arange(P)[None, :] - (P - p_lens)[:, None]).clamp(min=0)
    with attention_without_cudnn(dev):   # left padding: rows that attend to nothing
        out = base(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), position_ids=p_pos.to(dev),
                   use_cache=True)
    return _cache_of(out), out.last_hidden_state[:, -1], p_lens, p_mask


def _cache_kw(base) -> str:
    """transformers >= 5.25 names the KV-cache argument `cache` (`past_key_values` goes in 5.40); older, the latter."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _select_cache(cache, saved, rows: torch.Tensor):
    """The prompt cache restricted (and repeated) to `rows`, leaving the group's cache reusable."""
    if saved is None:  # a cache type with more state than keys/values
        c = copy.deepcopy(cache)
        c.batch_select_indices(rows)
        return c
    for layer, (k, v) in zip(cache.layers, saved):
        layer.keys, layer.values = k, v
    cache.batch_select_indices(rows)  # replaces the layer tensors; `saved` keeps the originals
    return cache


def _score_chunk(base, head, encoded, units, slot, cache, saved, last_hidden, p_lens, p_mask,
                 dev) -> torch.Tensor:
    """Per-unit float64 sums of the _token_stats columns for one bucket, on CPU."""
    rows = torch.tensor([slot[pi] for pi, _ in units])
    resp = [encoded[pi].response_ids[ri] for pi, ri in units]
    r_lens = torch.tensor([len(r) for r in resp])
    R = int(r_lens.max())
    N = len(units)
    r_ids = torch.zeros(N, R, dtype=torch.long)
    for j, r in enumerate(resp):
        r_ids[j, : len(r)] = torch.tensor(r)
    first = last_hidden[rows.to(dev)]  # the prompt's last state predicts each response's first token
    if R > 1:
        c = _select_cache(cache, saved, rows.to(dev))
        # Padding after the real tokens cannot affect them (causal), so the response part of the mask is all ones.
        mask = torch.cat([p_mask[rows], torch.ones(N, R - 1, dtype=torch.long)], dim=1)
        pos = p_lens[rows][:, None] + torch.arange(R - 1)[None, :]
        out = base(input_ids=r_ids[:, :-1].to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                   use_cache=True, **{_cache_kw(base): c})
        h = torch.cat([first[:, None], out.last_hidden_state], dim=1)  # [N, R, H]; t predicts token t
        del c, out
    else:
        h = first[:, None]
    valid = (torch.arange(R)[None, :] < r_lens[:, None]).to(dev)
    stats = _token_stats(head, h[valid], r_ids.to(dev)[valid])
    owner = torch.arange(N, device=dev)[:, None].expand(N, R)[valid]
    return _reduce_stats(stats, owner, N).cpu()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class _OutOfMemory(Exception):
    """An OOM inside one forward, with the batch that was in force."""

    def __init__(self, n_prompts: int, units: list[tuple[int, int]], tokens: int, minimal: bool):
        super().__init__(f"{n_prompts} prompts, {len(units)} responses, {tokens} padded tokens")
        self.n_prompts, self.units, self.tokens, self.minimal = n_prompts, units, tokens, minimal


def _score_group(base, head, encoded, group: _Group, dev, on_chunk) -> None:
    """Score one group; on_chunk(units, sums) after each bucket. OOM surfaces as _OutOfMemory."""
    p_max = max(len(encoded[pi].prompt_ids) for pi in group.probes)
    try:
        cache, last_hidden, p_lens, p_mask = _prompt_forward(base, encoded, group.probes, dev)
    except Exception as exc:
        if _is_oom(exc):
            raise _OutOfMemory(len(group.probes), [u for c in group.chunks for u in c],
                               len(group.probes) * p_max, minimal=len(group.probes) == 1) from exc
        raise
    plain = all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))
    saved = [(layer.keys, layer.values) for layer in cache.layers] if plain else None
    slot = {pi: k for k, pi in enumerate(group.probes)}
    for units in group.chunks:
        try:
            sums = _score_chunk(base, head, encoded, units, slot, cache, saved, last_hidden, p_lens, p_mask, dev)
        except Exception as exc:
            if _is_oom(exc):
                r_max = max(len(encoded[pi].response_ids[ri]) for pi, ri in units)
                raise _OutOfMemory(len(group.probes), units, len(units) * (p_max + r_max),
                                   minimal=len(group.probes) == 1 and len(units) == 1) from exc
            raise
        on_chunk(units, sums)


def _free_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()  # not inference_mode: buffers a forward caches lazily must stay usable in training
def score_probes(model, encoded: Sequence[EncodedProbe], *, device=None, max_batch_tokens: int = 8192,
                 progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
    """Exact per-response log pi(y|x) and metrics with prefix sharing; rows in `encoded` order
    (SCORE_SCHEMA). Out of memory halves `max_batch_tokens` and retries (module docstring)."""
    if max_batch_tokens < 1:
        raise LdpipeError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    from ldpipe.model.lora import unwrap

    model = unwrap(model)   # a LoRA model: the transformers model whose layers carry the adapter
    dev = _prepare(model, device)
    _check_bounds(model, encoded)
    head = _lm_head(model)
    base = model.base_model
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # Attention costs ~4*H*(P+R) flops per token and layer against ~24*H^2 for the dense parts.
    attn_scale = 6.0 * float(getattr(cfg, "hidden_size", 512))
    offsets, total = [], 0
    for ep in encoded:
        offsets.append(total)
        total += len(ep.response_ids)
    sums: list[list[float] | None] = [None] * total
    done = 0

    def on_chunk(units, chunk_sums: torch.Tensor) -> None:
        nonlocal done
        for (pi, ri), row in zip(units, chunk_sums.tolist()):
            sums[offsets[pi] + ri] = row
        done += len(units)
        if progress is not None:
            progress(done, total)

    budget = max_batch_tokens
    with eval_mode(model):
        pending = [(pi, ri) for pi, ep in enumerate(encoded) for ri in range(len(ep.response_ids))]
        while pending:
            failure = None
            for group in _plan(encoded, pending, budget, attn_scale):
                try:
                    _score_group(base, head, encoded, group, dev, on_chunk)
                except _OutOfMemory as oom:
                    failure = oom
                    break
            if failure is None:
                break
            pending = [u for u in pending if sums[offsets[u[0]] + u[1]] is None]
            # The tracebacks hold the failed forward's frames (and their tensors): drop them before retrying.
            failure.__traceback__ = None
            if failure.__cause__ is not None:
                failure.__cause__.__traceback__ = None
            _free_memory(dev)
            if failure.minimal or budget == 1:
                pi, ri = failure.units[0]
                ep = encoded[pi]
                raise LdpipeError(
                    f"probe scoring ran out of memory on {dev} even with one response per forward "
                    f"(example {ep.example_id!r}, response {ep.response_types[ri]!r}: {len(ep.prompt_ids)} prompt + "
                    f"{len(ep.response_ids[ri])} response tokens; max_batch_tokens in force: {budget}, "
                    f"started at {max_batch_tokens}). Lower probes.max_prompt_tokens / probes.max_response_tokens "
                    "in the experiment YAML, use a smaller model, or free memory on the device"
                ) from failure.__cause__
            new_budget = max(1, min(budget, failure.tokens) // 2)
            log.warning("probe scoring ran out of memory on %s with %s (max_batch_tokens in force: %d); "
                        "retrying the %d unscored responses with max_batch_tokens=%d",
                        dev, failure, budget, len(pending), new_budget)
            budget = new_budget
    ids = [ep.example_id for ep in encoded for _ in ep.response_ids]
    types = [t for ep in encoded for t in ep.response_types]
    n = [len(r) for ep in encoded for r in ep.response_ids]
    return _frame(ids, types, n, sums, _vocab(head))


# --------------------------------------------------------------------------- reference scorer

@torch.no_grad()
def score_naive(model, encoded: Sequence[EncodedProbe], *, device=None) -> pl.DataFrame:
    """The reference method: one full forward of prompt+response per response, full log-softmax everywhere.
    The metrics are computed by brute force in float64 over the full distribution (an independent check)."""
    dev = _prepare(model, device)
    _check_bounds(model, encoded)
    ids, types, ns, sums = [], [], [], []
    vocab = None
    with eval_mode(model):
        for ep in encoded:
            P = len(ep.prompt_ids)
            for rtype, r in zip(ep.response_types, ep.response_ids):
                seq = torch.tensor([ep.prompt_ids + r], device=dev)
                logits = model(input_ids=seq).logits[0].float()
                vocab = logits.shape[-1]
                logp = F.log_softmax(logits, dim=-1)
                # Position t predicts token t+1: response tokens are predicted from positions P-1 .. P+len(r)-2.
                pred = logp[P - 1: P - 1 + len(r)]
                labels = seq[0, P:]
                lp = pred.gather(1, labels[:, None]).squeeze(1)
                # Metrics: float64 probabilities, brute force over the whole vocabulary.
                pd = pred.double()
                pi = pd.exp()
                onehot = F.one_hot(labels, vocab).double()
                top = pd.argmax(dim=-1, keepdim=True)
                not_max = pd.scatter(1, top, float("-inf")).logsumexp(dim=-1)  # log sum of non-argmax pi
                ids.append(ep.example_id)
                types.append(rtype)
                ns.append(len(r))
                sums.append([
                    lp.double().sum().item(),
                    pred.max(dim=-1).values.double().sum().item(),
                    pi.norm(dim=-1).sum().item(),
                    (pi - onehot).norm(dim=-1).sum().item(),
                    (1.0 - pi.gather(1, labels[:, None])).sum().item(),
                    not_max.sum().item(),
                    float((top.squeeze(1) == labels).sum().item()),
                ])
    return _frame(ids, types, ns, sums, vocab or _vocab(_lm_head(model)))


# --------------------------------------------------------------------------- training helper

def batch_logps(model, pairs: Sequence[tuple[list[int], list[int]]], *, device=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sum of log pi over each pair's response tokens: (logp_sum[B] fp32, n_tokens[B]).

    Sequences are prompt + response, right-padded; no attention mask is needed because
    padding only follows real tokens. Logits are formed only at response positions.
    """
    if not pairs:
        raise LdpipeError("batch_logps: no pairs")
    from ldpipe.model.lora import unwrap

    model = unwrap(model)   # a LoRA model: the transformers model whose layers carry the adapter
    dev = _prepare(model, device)
    head = _lm_head(model)
    for i, (p, r) in enumerate(pairs):
        if not p or not r:
            raise LdpipeError(f"batch_logps: pair {i} has an empty prompt or response")
    lens = [len(p) + len(r) for p, r in pairs]
    T = max(lens)
    B = len(pairs)
    ids = torch.zeros(B, T, dtype=torch.long)
    is_label = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, r) in enumerate(pairs):
        ids[i, : lens[i]] = torch.tensor(p + r)
        is_label[i, len(p): lens[i]] = True
    ids, is_label = ids.to(dev), is_label.to(dev)
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    pred_pos = torch.zeros_like(is_label)
    pred_pos[:, :-1] = is_label[:, 1:]  # the state at t predicts token t+1
    logits = head(hidden[pred_pos]).float()
    lp = F.log_softmax(logits, dim=-1).gather(1, ids[is_label][:, None]).squeeze(1)
    owner = torch.arange(B, device=dev)[:, None].expand(B, T)[is_label]
    # Summed in float64 (as the scorers do), returned as fp32.
    logp_sum = torch.zeros(B, device=dev, dtype=torch.float64).index_add(0, owner, lp.double()).float()
    n_tokens = torch.tensor([len(r) for _, r in pairs], device=dev, dtype=torch.long)
    return logp_sum, n_tokens
