"""`ldpipe bench scoring`: the probe scorer vs the reference implementation's method and a padded batch."""
from __future__ import annotations

import time
from typing import Callable

import polars as pl
import torch
import torch.nn.functional as F

from ldpipe.bench.common import set_threads
from ldpipe.scoring import SCORE_SCHEMA, EncodedProbe

# the baseline reports the core columns only; the scorer may add more metrics
_PADDED_SCHEMA = {k: SCORE_SCHEMA[k] for k in ("example_id", "response_type", "logp_sum", "n_tokens", "logp_mean",
                                              "argmax_logp_sum")}


@torch.no_grad()
def score_padded(model, encoded: list[EncodedProbe], *, batch_size: int = 16) -> pl.DataFrame:
    """Baseline: plain right-padded batches of prompt+response, no prefix sharing, full-vocabulary
    log-softmax at every position (what a straightforward batched implementation does)."""
    model.eval()
    units = [(ep, t, r) for ep in encoded for t, r in zip(ep.response_types, ep.response_ids)]
    rows = []
    for s in range(0, len(units), batch_size):
        chunk = units[s: s + batch_size]
        seqs = [ep.prompt_ids + r for ep, _, r in chunk]
        T = max(map(len, seqs))
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, : len(q)] = torch.tensor(q)
            mask[i, : len(q)] = 1
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (ep, rtype, r) in enumerate(chunk):
            P = len(ep.prompt_ids)
            pred = logp[i, P - 1: P - 1 + len(r)]
            lab = ids[i, P: P + len(r)]
            lp = pred.gather(1, lab[:, None]).double().sum().item()
            mx = pred.max(-1).values.double().sum().item()
            rows.append((ep.example_id, rtype, lp, len(r), lp / len(r), mx))
    return pl.DataFrame(rows, schema=_PADDED_SCHEMA, orient="row")


def _time(fn: Callable[[], pl.DataFrame], repeats: int) -> tuple[float, pl.DataFrame]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _bench_inputs(quick: bool, probes_path: str | None, n_prompts: int | None):
    from ldpipe.bench.common import default_model, encoded_probes, tokenizer

    # Speed does not depend on the weights: a randomly initialised default-size model is enough.
    model = default_model()
    n = n_prompts or (10 if quick else 40)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, 512)
    if not probes_path:
        return model, encoded_probes(n), "built-in synthetic default"
    from ldpipe.data import load_reference_probes
    from ldpipe.scoring import encode_probes

    probes = load_reference_probes(probes_path)
    keep = probes["example_id"].unique(maintain_order=True).head(n).to_list()
    probes = probes.filter(pl.col("example_id").is_in(keep))
    return model, encode_probes(tokenizer(), probes, max_prompt_tokens=256, max_response_tokens=256), str(probes_path)


def bench_scoring(*, quick: bool = False, probes_path: str | None = None, n_prompts: int | None = None,
                  threads: int | None = None, repeats: int | None = None) -> dict:
    from ldpipe.models import count_parameters
    from ldpipe.scoring import score_naive, score_probes

    set_threads(threads)
    model, encoded, source = _bench_inputs(quick, probes_path, n_prompts)
    repeats = repeats or (1 if quick else 2)
    n_resp = sum(len(ep.response_ids) for ep in encoded)
    resp_tokens = sum(len(r) for ep in encoded for r in ep.response_ids)
    seq_tokens = sum(len(ep.prompt_ids) + len(r) for ep in encoded for r in ep.response_ids)
    score_probes(model, encoded[:2])  # warm-up (allocator, kernels)
    methods = {
        "reference": lambda: score_naive(model, encoded),
        "padded": lambda: score_padded(model, encoded),
        "ldpipe": lambda: score_probes(model, encoded),
    }
    results, frames = [], {}
    for name, fn in methods.items():
        secs, frame = _time(fn, repeats)
        frames[name] = frame
        results.append({"method": name, "seconds": secs, "responses_per_s": n_resp / secs,
                        "response_tokens_per_s": resp_tokens / secs, "sequence_tokens_per_s": seq_tokens / secs})
    ref = results[0]["seconds"]
    ref_frame = next(iter(frames.values())).sort("example_id", "response_type")
    for r in results:
        r["speedup_vs_reference"] = ref / r["seconds"]
        other = frames[r["method"]].sort("example_id", "response_type")
        r["max_abs_diff_vs_reference"] = float((other["logp_sum"] - ref_frame["logp_sum"]).abs().max())
    speed = results[-1]["speedup_vs_reference"]
    return {
        "benchmark": "scoring",
        "title": f"probe scoring: {n_resp} responses of {len(encoded)} prompts ({source}), "
                 f"{count_parameters(model):,} params, {torch.get_num_threads()} threads",
        "context": {"source": source, "prompts": len(encoded), "responses": n_resp, "response_tokens": resp_tokens,
                    "sequence_tokens": seq_tokens, "model_parameters": count_parameters(model),
                    "threads": torch.get_num_threads(), "repeats": repeats},
        "columns": ["method", "speedup_vs_reference", "responses_per_s", "response_tokens_per_s", "seconds",
                    "max_abs_diff_vs_reference"],
        "results": results,
        "goal": "ldpipe >= 20x the reference method on CPU",
        "goal_met": speed >= 20,
        "notes": "reference = batch 1, one full forward per response, full-vocabulary log-softmax (the paper's "
                 "code); padded = right-padded batches without prefix sharing; ldpipe = prompt KV computed once per "
                 "prompt, logits only at response positions",
    }
