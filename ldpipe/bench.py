"""`ldpipe bench`: speed measured side by side in one process, reported as ratios (absolute times as context).

Benchmarks are not tests: nothing here asserts a wall-clock threshold.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import polars as pl
import torch
import torch.nn.functional as F

from ldpipe.scoring import SCORE_SCHEMA, EncodedProbe


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
    return pl.DataFrame(rows, schema=SCORE_SCHEMA, orient="row")


def _time(fn: Callable[[], pl.DataFrame], repeats: int) -> tuple[float, pl.DataFrame]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _bench_inputs(quick: bool, probes_path: str | None, n_prompts: int | None):
    from ldpipe.models import TinyModelConfig, build_model, train_tokenizer
    from ldpipe.probes import ProbeRecipe, build_probe_set
    from ldpipe.scoring import encode_probes
    from ldpipe.synthetic import SyntheticConfig, generate, human_sentence

    world = generate(SyntheticConfig(seed=0))
    tok = train_tokenizer(world.corpus, vocab_size=2048)
    # Speed does not depend on the weights: a randomly initialised default-size model is enough.
    model = build_model(TinyModelConfig(), vocab_size=len(tok))
    n = n_prompts or (10 if quick else 40)
    if probes_path:
        from ldpipe.data import load_reference_probes

        probes = load_reference_probes(probes_path)
        keep = probes["example_id"].unique(maintain_order=True).head(n).to_list()
        probes = probes.filter(pl.col("example_id").is_in(keep))
        limits = dict(max_prompt_tokens=256, max_response_tokens=256)
        source = str(probes_path)
    else:
        probes = build_probe_set(world.preferences, ProbeRecipe(n_examples=n, seed=0), rephrases=world.rephrases,
                                 human_sentence=human_sentence).probes
        limits = dict(max_prompt_tokens=96, max_response_tokens=64)
        source = "built-in synthetic default"
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, 512)
    return model, encode_probes(tok, probes, **limits), source


def bench_scoring(*, quick: bool = False, probes_path: str | None = None, n_prompts: int | None = None,
                  threads: int | None = None, repeats: int | None = None) -> dict:
    from ldpipe.models import count_parameters
    from ldpipe.scoring import score_naive, score_probes

    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
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
    return {
        "benchmark": "scoring", "source": source, "prompts": len(encoded), "responses": n_resp,
        "response_tokens": resp_tokens, "sequence_tokens": seq_tokens,
        "model_parameters": count_parameters(model), "threads": torch.get_num_threads(), "repeats": repeats,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "results": results,
    }


BENCHMARKS = {"scoring": bench_scoring}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ldpipe bench {report['benchmark']}: {report['responses']} responses of "
                    f"{report['prompts']} prompts ({report['source']}), {report['model_parameters']:,} params, "
                    f"{report['threads']} threads")
    for col in ("method", "speedup vs reference", "responses/s", "response tok/s", "seconds", "max |Δ| nats"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in report["results"]:
        t.add_row(r["method"], f"{r['speedup_vs_reference']:.1f}x", f"{r['responses_per_s']:.0f}",
                  f"{r['response_tokens_per_s']:.0f}", f"{r['seconds']:.2f}", f"{r['max_abs_diff_vs_reference']:.1e}")
    Console(width=120).print(t)
    print("reference = batch 1, one full forward per response, full-vocabulary log-softmax (the paper's code); "
          "padded = right-padded batches without prefix sharing; ldpipe = prompt KV computed once per prompt, "
          "logits only at response positions")


def run_bench(name: str, *, json_out: Path | None = None, **kwargs) -> dict:
    report = BENCHMARKS[name](**kwargs)
    print_report(report)
    if json_out:
        from ldpipe.atomic import write_json

        write_json(report, json_out)
    print(json.dumps(report, default=str))
    return report
