"""Column contracts shared by every ldpipe module.

All tables are long and use named columns (never positional arrays): the
reference implementation's positional npy rows changed layout four times and
broke its own notebooks (the reference implementation renamed saved columns between versions).
"""
from __future__ import annotations

import polars as pl

# A preference dataset: one row per (prompt, chosen, rejected) pair.
PREFERENCE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,   # unique within the dataset
    "split": pl.String,        # "train" | "test"
    "prompt": pl.String,       # ends with "\n\nAssistant:" for HH-style data
    "chosen": pl.String,       # y+ (leading space kept, as in HH)
    "rejected": pl.String,     # y-
    "source": pl.String,       # where the row came from (dataset name / file)
}

# A probe set in long form: one row per (probe example, response type).
PROBE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,     # the probe prompt's id (x_u)
    "response_type": pl.String,  # e.g. "chosen", "rejected", "irr_train", ...
    "prompt": pl.String,
    "response": pl.String,
    "provenance": pl.String,     # how the response was made (e.g. "dataset", "template:meaning", "shuffle:seed=3")
}

# One probe-trajectory row: the log-probability of one probe response at one step of one run.
TRAJECTORY_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "config_hash": pl.String,
    "phase": pl.String,          # "sft" | "dpo" | ...
    "step": pl.Int64,            # optimizer steps done before this evaluation
    "epoch": pl.Float64,         # step / steps_per_epoch
    "example_id": pl.String,
    "response_type": pl.String,
    "logp_sum": pl.Float64,      # sum over response tokens (EOS included) of log pi
    "n_tokens": pl.Int64,
    "logp_mean": pl.Float64,     # logp_sum / n_tokens
    "argmax_logp_sum": pl.Float64,  # teacher-forced sum of log max_v pi (the paper's y*)
    # Per-sequence metrics over response positions (ldpipe.model.scoring docstring; null in shards written before them):
    "A_o": pl.Float64,           # sqrt(V * (mean_l ||pi_l||)^2 + V - 2), the reference's ||A_o||_F
    "p_e": pl.Float64,           # mean_l ||pi_l - e_{y_l}||_2, size of the SFT residual G
    "energy": pl.Float64,        # mean_l (1 - pi_l(y_l))
    "except_argmax": pl.Float64,  # sum_l log(1 - max_v pi_l), computed stably
    "argmax_match": pl.Int64,     # response positions whose token is the argmax of pi_l (null in older shards)
}

# How each probe prompt's rejected answer relates to its chosen one (written by the probe-set stage).
PROBE_PAIRS_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.String,
    "example_id": pl.String,
    "rejected_kind": pl.String,   # the dataset's own label when it has one (built-in world: REJECTED_KINDS), else null
    "word_overlap": pl.Float64,   # |words(y+) ∩ words(y-)| / |words(y+) ∪ words(y-)|, words = lower-cased [a-z0-9']+
}

# How much of each response type's probe rows the scorer cuts (written by the model-probe stage, which has the
# tokenizer): prompts keep their LAST max_prompt_tokens tokens, responses their FIRST max_response_tokens - 1 + EOS.
PROBE_TRUNCATION_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.String,
    "response_type": pl.String,
    "rows": pl.Int64,                     # probe rows of this type
    "max_prompt_tokens": pl.Int64,
    "prompts_cut": pl.Int64,              # rows whose prompt is longer than max_prompt_tokens
    "prompt_tokens_dropped": pl.Int64,    # tokens cut off the front of those prompts, summed
    "max_response_tokens": pl.Int64,
    "responses_cut": pl.Int64,            # rows whose response (+ EOS) is longer than max_response_tokens
    "response_tokens_dropped": pl.Int64,  # tokens cut off the end of those responses, summed
}

# Training metrics: one row per optimizer step.
TRAIN_METRICS_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "config_hash": pl.String,
    "phase": pl.String,
    "step": pl.Int64,
    "epoch": pl.Float64,
    "loss": pl.Float64,
    "grad_norm": pl.Float64,     # before clipping
    "clip_factor": pl.Float64,   # min(1, max_norm / grad_norm)
    "lr": pl.Float64,
    # DPO/IPO only (null for SFT), TRL-style batch means before the step's update:
    "rewards_chosen": pl.Float64,    # beta * (log pi(y+) - log pi_ref(y+))
    "rewards_rejected": pl.Float64,  # beta * (log pi(y-) - log pi_ref(y-))
    "rewards_accuracy": pl.Float64,  # share of pairs with rewards_chosen > rewards_rejected
    "rewards_margin": pl.Float64,    # rewards_chosen - rewards_rejected
    # on-policy DPO/IPO only (null otherwise): the step's sampled replies
    "onpolicy_score_mean": pl.Float64,   # mean scorer score of all samples of the batch
    "onpolicy_tied_share": pl.Float64,   # share of the batch's prompts skipped because best and worst tied
}

# Generation-based squeezing statistics: one row per (run, checkpoint) (ldpipe.analysis.squeezing).
GENERATION_STATS_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "checkpoint": pl.String,       # "start" | "step-XXXXXXX" | "final"
    "step": pl.Int64,              # the run's local optimizer steps at this checkpoint
    "n_prompts": pl.Int64,         # probe prompts whose chosen response was scored
    "n_positions": pl.Int64,       # response positions (EOS included) pooled for the two means below
    "mean_max_prob": pl.Float64,   # mean over positions of max_v pi(v | x, y+_<t)
    "mean_entropy": pl.Float64,    # mean over positions of -sum_v pi log pi (nats)
    "mean_logp_token": pl.Float64,  # mean over positions of log pi(y+_t | x, y+_<t)
    "n_generations": pl.Int64,     # greedy generations (probe prompts + held-out prompts)
    "repeat_ngram": pl.Int64,      # n of the repeater rate
    "repeater_rate": pl.Float64,   # share of generations in which some word n-gram occurs >= 2 times
    "mean_distinct_ngrams": pl.Float64,  # mean over generations with >= n words of distinct/total word n-grams
    "mean_gen_words": pl.Float64,  # mean generation length in words
}

# Hallucination borrowing in generations: one row per (run, checkpoint, prompt) (ldpipe.analysis.borrowing).
GENERATION_BORROWING_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "checkpoint": pl.String,
    "step": pl.Int64,
    "example_id": pl.String,
    "split": pl.String,            # "train" (probe prompts, trained on) | "test" (held out)
    "generation": pl.String,       # greedy continuation
    "ngram": pl.Int64,             # n of the word n-grams
    "n_ngrams": pl.Int64,          # distinct word n-grams of the generation
    "n_own": pl.Int64,             # ... occurring in this prompt or its own chosen answer
    "n_borrowed": pl.Int64,        # ... occurring in another train prompt's chosen answer and not in own
    "borrow_share": pl.Float64,    # n_borrowed / n_ngrams (null when n_ngrams = 0)
    "own_share": pl.Float64,       # n_own / n_ngrams
    "n_fact_values": pl.Int64,     # synthetic only: distinct fact values mentioned (own entity name excluded)
    "n_foreign_values": pl.Int64,  # ... that are facts of other entities and not of the prompt's entity
    "fact_borrow_share": pl.Float64,  # n_foreign_values / n_fact_values (null: none mentioned / not synthetic)
    "correct_value": pl.Boolean,   # synthetic only: the asked fact's true value is mentioned
    "repeats": pl.Boolean,         # some word n-gram (generation_analysis.repeat_ngram) occurs twice (null: older)
}

# LLM-judge verdicts: one row per (checkpoint pair, prompt, A/B order) (ldpipe.analysis.winrate).
WIN_RATE_JUDGMENT_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.String,
    "model_a": pl.String,          # checkpoint reference, e.g. "extend_dpo" (final) or "sft@start"
    "model_b": pl.String,
    "judge_model": pl.String,
    "example_id": pl.String,
    "order": pl.String,            # "a_first" (a shown as Response A) | "b_first" (b shown as Response A)
    "verdict": pl.String,          # the judge's slot: "A" | "B" | "tie" | null (unparsable)
    "winner": pl.String,           # "a" | "b" | "tie" | "unparsable"
    "response_a": pl.String,       # model a's generation
    "response_b": pl.String,
    "judge_text": pl.String,
}

# Cross-example influence (ldpipe.influence.runs): one row per (checkpoint, method, update, observed probe).
INFLUENCE_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "checkpoint": pl.String,        # "start" | "step-0000040" (a snapshot) | "final"
    "checkpoint_step": pl.Int64,    # the run's local optimizer step of that checkpoint
    "method": pl.String,            # "exact" | "projected" | "naive" (real SGD step) | "naive_optimizer" (real run optimizer step)
                                    # | "exact_precond" | "projected_precond" (Adam/RMSprop-preconditioned, see `precond`)
    "train_example_id": pl.String,  # the update's example (x_u)
    "train_response_type": pl.String,  # SFT: the supervised type; DPO/IPO: "dpo"/"ipo" (chosen and rejected)
    "observed_example_id": pl.String,
    "observed_response_type": pl.String,
    "entk": pl.Float64,             # d_i . g_j (loss coefficients included, no lr); null for naive methods
    "lr_eff": pl.Float64,           # lr_t * clip_t / batch_size: one example's share of the step at that checkpoint
    "value": pl.Float64,            # predicted (lr_eff * entk) or realised (naive) change of log pi(y_j|x_j), nats
    # exact_precond / projected_precond: the optimizer's preconditioner on the training side, built from the
    # checkpoint's optimizer_state.pt ("adamw" | "adam" | "rmsprop", with the step: "adamw@40");
    # naive_optimizer: the state its real step was loaded with ("fresh" where none); null for SGD methods
    "precond": pl.String,
}

INFLUENCE_AGREEMENT_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "checkpoint": pl.String,
    "checkpoint_step": pl.Int64,
    "estimate": pl.String,          # "projected" | "naive" (ref exact); "projected_precond" (ref exact_precond);
                                    # "exact" | "exact_precond" (ref naive_optimizer: SGD vs preconditioned prediction)
    "reference": pl.String,         # "exact" | "exact_precond" | "naive_optimizer"
    "spearman": pl.Float64,
    "pearson": pl.Float64,
    "relative_error": pl.Float64,   # ||estimate - reference|| / ||reference||
    "sign_agreement": pl.Float64,
    "n": pl.Int64,                  # entries compared
}

# A-K-G at one observed position: Delta log pi(y_t) ~= -lr_eff * [A K G]_{y_t}.
AKG_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "checkpoint": pl.String,
    "checkpoint_step": pl.Int64,
    "train_example_id": pl.String,
    "train_response_type": pl.String,
    "observed_example_id": pl.String,
    "observed_response_type": pl.String,
    "position": pl.Int64,           # index of the observed response token (0 = first)
    "observed_token": pl.Int64,
    "lr_eff": pl.Float64,
    "pi_token": pl.Float64,         # pi(y_t) before the update (A = I - 1 pi^T)
    "kg_token": pl.Float64,         # (K G)[y_t]
    "kg_expect": pl.Float64,        # pi . (K G): what A subtracts
    "kg_norm": pl.Float64,          # ||K G|| over the vocabulary
    "g_norm": pl.Float64,           # ||G|| of the whole update (all its tokens and terms)
    "predicted_delta": pl.Float64,  # -lr_eff * (kg_token - kg_expect)
    "realised_delta": pl.Float64,   # after a real SGD step of lr_eff on the update
}

# Heat map: mean eNTK influence of SFT on one trained-on type (or a DPO step) on each observed type.
INFLUENCE_HEATMAP_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "checkpoint": pl.String,        # a checkpoint, or "accumulated" (sum over checkpoints of lr_eff_t x influence_t)
    "checkpoint_step": pl.Int64,    # null for "accumulated"
    "trained_type": pl.String,      # a probe type (SFT on it) or "dpo" (DPO on chosen vs rejected)
    "observed_type": pl.String,
    "scope": pl.String,             # "same_prompt" (x_o = x_u) | "other_prompt"
    "entk_mean": pl.Float64,        # mean d . g over (update, observed) pairs; null for "accumulated"
    "value": pl.Float64,            # mean predicted change of log pi per update, nats
    "n": pl.Int64,
}


# On-policy DPO/IPO: the pair sampled and ranked for each batch prompt at each optimizer step.
ONPOLICY_PAIRS_TABLE_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "config_hash": pl.String,
    "step": pl.Int64,            # the optimizer step these samples were drawn for (before its update)
    "prompt_index": pl.Int64,    # index into the run's training prompts
    "prompt": pl.String,
    "chosen": pl.String,         # best-scored sample (null when every sample tied)
    "rejected": pl.String,       # worst-scored sample
    "chosen_score": pl.Float64,
    "rejected_score": pl.Float64,
    "score_mean": pl.Float64,    # mean score of the prompt's samples
    "tied": pl.Boolean,          # no pair: best and worst scored the same
}

# Canonical response types. Users may declare more in assets/ YAML.
CORE_RESPONSE_TYPES = (
    "chosen",            # y+
    "rejected",          # y-
    "chosen_gptsemantic",   # y_gpts+: meaning-keeping rephrase of y+
    "chosen_gptformat",     # y_gptf+: format-keeping, meaning-changing rephrase of y+
    "reject_gptsemantic",   # y_gpts-
    "reject_gptformat",     # y_gptf-
    "irr_train",         # y_{j!=u}: another probe prompt's chosen answer
    "irr_test",          # y_test: a chosen answer from the held-out split
    "irr_hum",           # y_hum: irrelevant human-like sentence of similar length
    "random_permute",    # y_urnd: word shuffle of y+
    "random_nonhum",     # y_rnd (reference): word shuffle of an unrelated answer
    "random_tokens",     # y_rnd (uniform random tokens)
    "chosen_initial",    # y_init: the base model's own reply
    "chosen_selfr",      # y_selfr: the base model's self-rephrase of y+
)


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType], *, what: str) -> pl.DataFrame:
    """Select and cast `df` to `schema`, failing with a message naming the missing columns."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; have {df.columns}")
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])


def require_frame(df: object, columns, *, source: str) -> pl.DataFrame:
    """`df` must be a polars DataFrame holding `columns`; otherwise a DataValidationError naming the source."""
    from ldpipe.errors import DataValidationError

    if not isinstance(df, pl.DataFrame):
        raise DataValidationError(source, f"expected a polars DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataValidationError(source, f"missing column(s) {missing}; have {df.columns}", field=missing[0])
    return df
