"""`ldpipe bench influence`: projected vs exact eNTK vs the naive one-step validator, same checkpoint and subset.

Training side: SFT updates on the first N train pairs; observed side: the probe set's responses (M).
Naive one-step really takes each of the N steps, re-scores all M probes and restores the weights, so
its cost grows with N x M; exact and projected cost grows with N + M. Agreement: projected vs exact
(Spearman, relative error) and exact vs naive (the linearisation error, at a small step).
"""
from __future__ import annotations

import polars as pl
import torch

from ldpipe.bench.common import bench_model, encoded_probes, set_threads, timed, tokenizer, world


def _inputs(n_train: int, n_prompts: int, model_path: str | None, arch: str):
    from ldpipe.model.scoring import encode_pair

    if model_path:
        from ldpipe.model.checkpoints import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(model_path)
    else:
        model, tok = bench_model(arch), tokenizer()
    train = world().preferences.filter(pl.col("split") == "train").sort("example_id").head(n_train)
    train_pairs = [encode_pair(tok, p, c, max_prompt_tokens=96, max_response_tokens=64)
                   for p, c in zip(train["prompt"].to_list(), train["chosen"].to_list())]
    if model_path:
        from ldpipe.bench.common import probe_frame
        from ldpipe.model.scoring import encode_probes

        enc = encode_probes(tok, probe_frame(n_prompts), max_prompt_tokens=96, max_response_tokens=64)
    else:
        enc = encoded_probes(n_prompts)
    probe_pairs = [(ep.prompt_ids, r) for ep in enc for r in ep.response_ids]
    return model, train_pairs, probe_pairs


def _with_adapter(model):
    """A copy of `model` with a fresh LoRA adapter (r=8), only the adapter trainable."""
    import copy

    from ldpipe.model.lora import apply_lora
    from ldpipe.spec import LoraSpec

    return apply_lora(copy.deepcopy(model), LoraSpec(r=8), ".", seed=0)


def bench_influence(*, quick: bool = False, threads: int | None = None, model_path: str | None = None,
                    rank: int = 32, lr: float = 1e-4, arch: str = "default", device: str | None = None) -> dict:
    from ldpipe.bench.common import bench_device
    from ldpipe.influence.entk import agreement, exact_entk, naive_one_step
    from ldpipe.influence.projected import projected_entk

    n_threads = set_threads(threads)
    dev = bench_device(device)
    if arch == "default":   # (train examples, probe prompts)
        sizes = [(8, 4)] if quick else [(8, 4), (16, 10), (32, 20), (64, 40)]
    else:                   # exact holds full per-sequence gradients: 0.6-1.6 GB each at 160M-410M
        sizes = [(4, 2)] if quick else [(8, 4), (16, 8)]
    results = []
    model = None
    for n_train, n_prompts in sizes:
        model, train_pairs, probe_pairs = _inputs(n_train, n_prompts, model_path, arch)
        model.to(dev).eval()
        if not results:   # untimed: first-use costs (allocator, cuBLAS) would land on the first method only
            timed(lambda: exact_entk(model, train_pairs[:1], probe_pairs[:2]), dev)
        t_exact, exact = timed(lambda: exact_entk(model, train_pairs, probe_pairs), dev)
        t_proj, proj = timed(lambda: projected_entk(model, train_pairs, probe_pairs, rank=rank, seed=0), dev)
        t_naive, naive = timed(lambda: torch.stack([naive_one_step(model, train_pairs, probe_pairs, lr=lr, i=i)
                                                    for i in range(len(train_pairs))]), dev)
        # the same exact eNTK over a LoRA adapter's parameters only (r=8 on the attention projections, peft's
        # default for the architecture): what `lora:` runs' influence assets compute
        lora_model = _with_adapter(model)
        t_lora, _ = timed(lambda: exact_entk(lora_model, train_pairs, probe_pairs), dev)
        lora_params = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
        del lora_model
        pe = agreement(proj, exact)
        en = agreement(exact * lr, naive)
        results.append({
            "workload": f"{len(train_pairs)} train x {len(probe_pairs)} probes",
            "naive_s": t_naive, "exact_s": t_exact, "projected_s": t_proj,
            "exact_speedup_vs_naive": t_naive / t_exact,
            "projected_speedup_vs_naive": t_naive / t_proj,
            "spearman_projected_vs_exact": pe["spearman"], "relerr_projected_vs_exact": pe["relative_error"],
            "spearman_exact_vs_naive": en["spearman"], "relerr_exact_vs_naive": en["relative_error"],
            "exact_lora_s": t_lora, "lora_speedup_vs_exact": t_exact / t_lora, "lora_parameters": lora_params,
        })
    from ldpipe.model.lm import count_parameters

    last = results[-1]
    met = (last["projected_speedup_vs_naive"] >= 50 and last["spearman_projected_vs_exact"] >= 0.9
           and last["exact_speedup_vs_naive"] >= 4)
    return {
        "benchmark": "influence",
        "title": f"{count_parameters(model):,} params ({model_path or f'{arch} architecture, random weights'}), "
                 f"projection rank {rank}, naive step lr {lr}, {dev.type}, {n_threads} threads",
        "context": {"model": model_path or "random", "arch": arch, "parameters": count_parameters(model),
                    "rank": rank, "lr": lr, "threads": n_threads, "device": str(dev)},
        "columns": ["workload", "naive_s", "exact_s", "projected_s", "exact_speedup_vs_naive",
                    "projected_speedup_vs_naive", "spearman_projected_vs_exact", "relerr_projected_vs_exact",
                    "spearman_exact_vs_naive", "relerr_exact_vs_naive", "exact_lora_s", "lora_speedup_vs_exact",
                    "lora_parameters"],
        "results": results,
        "goal": "projected >= 50x faster than naive with Spearman >= 0.9 vs exact; exact >= 4x faster than naive "
                "(judged on the largest workload)",
        "goal_met": met,
        "notes": "naive = take the SGD step, re-score every probe, restore (cost ~ N x M); exact = per-sequence "
                 "gradient inner products; projected = LoGra-style factored per-layer projection (cost ~ N + M); "
                 "exact_lora = exact over a LoRA adapter's parameters (r=8), lora_speedup_vs_exact = exact_s / "
                 "exact_lora_s on the same model and workload.",
    }
