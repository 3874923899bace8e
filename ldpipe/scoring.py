"""Probe log-probabilities: a fast exact scorer, the naive reference, and the training helper.

Conventions follow the paper's code (learning-dynamics.md §4, §7): prompt and
response are tokenized separately without special tokens, EOS is appended to
the response, and log pi(y|x) is the fp32 log-softmax SUMMED over the response
tokens (EOS included, prompt excluded).

Truncation: the prompt keeps its LAST `max_prompt_tokens` tokens (HH keeps the
end, where the question is); the response keeps its FIRST
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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import polars as pl
import torch
import torch.nn.functional as F

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.schema import PROBE_SCHEMA

SCORE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,
    "response_type": pl.String,
    "logp_sum": pl.Float64,
    "n_tokens": pl.Int64,
    "logp_mean": pl.Float64,
    "argmax_logp_sum": pl.Float64,
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

def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LdpipeError("the tokenizer has no eos token; responses must end in EOS")
    return int(eos)


def _check_limits(max_prompt_tokens: int, max_response_tokens: int) -> None:
    if max_prompt_tokens < 1 or max_response_tokens < 1:
        raise LdpipeError(f"need max_prompt_tokens >= 1 and max_response_tokens >= 1, "
                          f"got {max_prompt_tokens} and {max_response_tokens}")


def _truncate(prompt_ids: list[int], response_ids: list[int], eos: int,
              max_prompt_tokens: int, max_response_tokens: int) -> tuple[list[int], list[int]]:
    return prompt_ids[-max_prompt_tokens:], response_ids[: max_response_tokens - 1] + [eos]


def encode_pair(tokenizer, prompt: str, response: str, *, max_prompt_tokens: int = 128,
                max_response_tokens: int = 96) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) with the truncation rules in the module docstring."""
    _check_limits(max_prompt_tokens, max_response_tokens)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not p:
        raise LdpipeError(f"prompt {prompt[:40]!r} is empty after tokenization; "
                          "the first response token needs a prompt to be predicted from")
    return _truncate(p, r, _eos_id(tokenizer), max_prompt_tokens, max_response_tokens)


def encode_probes(tokenizer, probes: pl.DataFrame, *, max_prompt_tokens: int = 128,
                  max_response_tokens: int = 96, source: str = "probes") -> list[EncodedProbe]:
    """Group PROBE_SCHEMA rows by example_id (first-seen order) and tokenize them."""
    _check_limits(max_prompt_tokens, max_response_tokens)
    missing = [c for c in ("example_id", "response_type", "prompt", "response") if c not in probes.columns]
    if missing:
        raise DataValidationError(source, f"missing column(s) {missing}; expected {list(PROBE_SCHEMA)}")
    eos = _eos_id(tokenizer)
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

    prompt_tok = tokenizer([groups[e][0] for e in order], add_special_tokens=False)["input_ids"] if order else []
    flat_resp = [resp for e in order for _, resp in groups[e][1]]
    resp_tok = tokenizer(flat_resp, add_special_tokens=False)["input_ids"] if flat_resp else []

    out: list[EncodedProbe] = []
    k = 0
    for e, p_ids in zip(order, prompt_tok):
        if not p_ids:
            row = next(i for i, r in enumerate(rows) if r[0] == e)
            raise DataValidationError(source, f"prompt of example {e!r} is empty after tokenization",
                                      row=row, field="prompt")
        types, ids = [], []
        for rtype, _ in groups[e][1]:
            p, r = _truncate(p_ids, resp_tok[k], eos, max_prompt_tokens, max_response_tokens)
            types.append(rtype)
            ids.append(r)
            k += 1
        out.append(EncodedProbe(example_id=e, prompt_ids=p, response_types=types, response_ids=ids))
    return out


# --------------------------------------------------------------------------- shared helpers

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _prepare(model, device) -> torch.device:
    if device is None:
        return _model_device(model)
    dev = torch.device(device)
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


def _token_stats(head, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: log pi(label) and log max_v pi, via an fp32 log-softmax, in bounded chunks."""
    chunk = max(1, _LOGIT_CHUNK_ELEMENTS // head.out_features if hasattr(head, "out_features") else 1024)
    lp, mx = [], []
    for i in range(0, hidden.size(0), chunk):
        logits = head(hidden[i:i + chunk]).float()
        lse = torch.logsumexp(logits, dim=-1)
        lp.append(logits.gather(1, labels[i:i + chunk, None]).squeeze(1) - lse)
        mx.append(logits.max(dim=-1).values - lse)
    if not lp:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(lp), torch.cat(mx)


def _frame(ids: list[str], types: list[str], lp: list[float], n: list[int], mx: list[float]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "example_id": ids,
            "response_type": types,
            "logp_sum": lp,
            "n_tokens": n,
            "logp_mean": [a / b for a, b in zip(lp, n)],
            "argmax_logp_sum": mx,
        },
        schema=SCORE_SCHEMA,
    )


# --------------------------------------------------------------------------- fast scorer

def _plan_batches(encoded: Sequence[EncodedProbe], max_batch_tokens: int) -> list[list[tuple[int, int]]]:
    """Greedy batches of (probe, response) units, sorted by prompt length.

    A batch's cost is n_responses * (longest prompt + longest response): the
    padded size of the expanded cache and of the response batch. A probe whose
    responses do not fit is split across batches (its prompt re-runs, cheap).
    """
    units = sorted(
        ((pi, ri) for pi, ep in enumerate(encoded) for ri in range(len(ep.response_ids))),
        key=lambda u: (len(encoded[u[0]].prompt_ids), u[0], len(encoded[u[0]].response_ids[u[1]])),
    )
    batches: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    p_max = r_max = 0
    for pi, ri in units:
        p = len(encoded[pi].prompt_ids)
        r = len(encoded[pi].response_ids[ri])
        np_, nr = max(p_max, p), max(r_max, r)
        if cur and (len(cur) + 1) * (np_ + nr) > max_batch_tokens:
            batches.append(cur)
            cur, np_, nr = [], p, r
        cur.append((pi, ri))
        p_max, r_max = np_, nr
    if cur:
        batches.append(cur)
    return batches


def _score_batch(model, head, encoded: Sequence[EncodedProbe], units: list[tuple[int, int]],
                 dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log pi and of log max pi for each unit of one batch (fp32, on CPU)."""
    probes = list(dict.fromkeys(pi for pi, _ in units))  # unique, in order
    slot = {pi: k for k, pi in enumerate(probes)}
    p_lens = torch.tensor([len(encoded[pi].prompt_ids) for pi in probes])
    P = int(p_lens.max())
    G = len(probes)

    # 1) Prompts, left-padded so every prompt's last token sits in the last column.
    p_ids = torch.zeros(G, P, dtype=torch.long)
    for k, pi in enumerate(probes):
        p_ids[k, P - len(encoded[pi].prompt_ids):] = torch.tensor(encoded[pi].prompt_ids)
    p_mask = (torch.arange(P)[None, :] >= (P - p_lens)[:, None]).long()
    p_pos = (torch.arange(P)[None, :] - (P - p_lens)[:, None]).clamp(min=0)
    base = model.base_model
    out = base(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), position_ids=p_pos.to(dev), use_cache=True)
    cache = out.past_key_values
    last_hidden = out.last_hidden_state[:, -1]  # predicts each response's first token

    # 2) Responses, right-padded, after each one's own prompt cache.
    rows = torch.tensor([slot[pi] for pi, _ in units])
    resp = [encoded[pi].response_ids[ri] for pi, ri in units]
    r_lens = torch.tensor([len(r) for r in resp])
    R = int(r_lens.max())
    N = len(units)
    r_ids = torch.zeros(N, R, dtype=torch.long)
    for j, r in enumerate(resp):
        r_ids[j, : len(r)] = torch.tensor(r)
    cache.batch_select_indices(rows.to(dev))
    # Padding after the real tokens cannot affect them (causal), so the response part of the mask is all ones.
    mask = torch.cat([p_mask[rows], torch.ones(N, R, dtype=torch.long)], dim=1)
    pos = p_lens[rows][:, None] + torch.arange(R)[None, :]
    if R > 1:
        out2 = base(input_ids=r_ids[:, :-1].to(dev), attention_mask=mask[:, :-1].to(dev),
                    position_ids=pos[:, :-1].to(dev), past_key_values=cache, use_cache=True)
        resp_hidden = out2.last_hidden_state  # [N, R-1, H]; position t predicts response token t+1
    del cache

    # 3) Hidden states at real response positions only: first token from the prompt's last state.
    valid = torch.arange(R)[None, :] < r_lens[:, None]  # [N, R] label positions
    first = last_hidden[rows.to(dev)]
    if R > 1:
        h = torch.cat([first[:, None], resp_hidden], dim=1)  # [N, R, H]
    else:
        h = first[:, None]
    valid_d = valid.to(dev)
    lp, mx = _token_stats(head, h[valid_d], r_ids.to(dev)[valid_d])
    owner = torch.arange(N, device=dev)[:, None].expand(N, R)[valid_d]
    # Sums in float64: an fp32 sum of ~100 terms near -500 is off by several ulps (~1e-4 nats).
    lp_sum = torch.zeros(N, device=dev, dtype=torch.float64).index_add_(0, owner, lp.double())
    mx_sum = torch.zeros(N, device=dev, dtype=torch.float64).index_add_(0, owner, mx.double())
    return lp_sum.cpu(), mx_sum.cpu()


@torch.no_grad()
def score_probes(model, encoded: Sequence[EncodedProbe], *, device=None, max_batch_tokens: int = 8192,
                 progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
    """Exact per-response log pi(y|x) with prefix sharing; rows in `encoded` order (see SCORE_SCHEMA)."""
    if max_batch_tokens < 1:
        raise LdpipeError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    dev = _prepare(model, device)
    _check_bounds(model, encoded)
    head = _lm_head(model)
    offsets, total = [], 0
    for ep in encoded:
        offsets.append(total)
        total += len(ep.response_ids)
    lp_all = [0.0] * total
    mx_all = [0.0] * total
    was_training = model.training
    model.eval()
    try:
        done = 0
        for units in _plan_batches(encoded, max_batch_tokens):
            lp, mx = _score_batch(model, head, encoded, units, dev)
            for (pi, ri), a, b in zip(units, lp.tolist(), mx.tolist()):
                lp_all[offsets[pi] + ri] = a
                mx_all[offsets[pi] + ri] = b
            done += len(units)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)
    ids = [ep.example_id for ep in encoded for _ in ep.response_ids]
    types = [t for ep in encoded for t in ep.response_types]
    n = [len(r) for ep in encoded for r in ep.response_ids]
    return _frame(ids, types, lp_all, n, mx_all)


# --------------------------------------------------------------------------- reference scorer

@torch.no_grad()
def score_naive(model, encoded: Sequence[EncodedProbe], *, device=None) -> pl.DataFrame:
    """The reference method: one full forward of prompt+response per response, full log-softmax everywhere."""
    dev = _prepare(model, device)
    _check_bounds(model, encoded)
    was_training = model.training
    model.eval()
    ids, types, lps, ns, mxs = [], [], [], [], []
    try:
        for ep in encoded:
            P = len(ep.prompt_ids)
            for rtype, r in zip(ep.response_types, ep.response_ids):
                seq = torch.tensor([ep.prompt_ids + r], device=dev)
                logp = F.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)
                # Position t predicts token t+1: response tokens are predicted from positions P-1 .. P+len(r)-2.
                pred = logp[P - 1: P - 1 + len(r)]
                labels = seq[0, P:]
                ids.append(ep.example_id)
                types.append(rtype)
                lps.append(pred.gather(1, labels[:, None]).double().sum().item())
                mxs.append(pred.max(dim=-1).values.double().sum().item())
                ns.append(len(r))
    finally:
        model.train(was_training)
    return _frame(ids, types, lps, ns, mxs)


# --------------------------------------------------------------------------- training helper

def batch_logps(model, pairs: Sequence[tuple[list[int], list[int]]], *, device=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sum of log pi over each pair's response tokens: (logp_sum[B] fp32, n_tokens[B]).

    Sequences are prompt + response, right-padded; no attention mask is needed because
    padding only follows real tokens. Logits are formed only at response positions.
    """
    if not pairs:
        raise LdpipeError("batch_logps: no pairs")
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
