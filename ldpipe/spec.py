"""Experiment declarations: the YAML files in assets/ parsed into typed, validated specs.

Every model forbids unknown keys, so a typo ("learning_rate" for "lr") is an error
naming the file and the key path instead of a silently ignored setting.

One file on purpose (it is longer than ldpipe's ~400-line rule): it is the declaration language, and a reader
looking for what a YAML key does, its default and its validation finds every key of every section here.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from ldpipe.errors import SpecError
from ldpipe.schema import CORE_RESPONSE_TYPES

_NAME = re.compile(r"[a-z][a-z0-9_]{0,40}\Z")   # with .match: the whole string (no trailing newline)
_NAME_RULE = "[a-z][a-z0-9_]{0,40} exactly (a lower-case letter, then up to 40 lower-case letters, digits or '_')"


def _known_types(types: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A misspelt response type is named at `ldpipe check`, not after the dataset step has run."""
    unknown = [t for t in types or () if t not in CORE_RESPONSE_TYPES]
    if unknown:
        raise ValueError(f"unknown response type(s) {unknown}; known: {list(CORE_RESPONSE_TYPES)}")
    return types


class _Strict(BaseModel):
    # every float must be finite: `epochs: .inf` is a declaration error, not an OverflowError at run time
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyntheticSpec(_Strict):
    seed: int = 0
    n_entities: int = Field(60, gt=0)
    n_train: int = Field(200, gt=0)
    n_test: int = Field(50, gt=0)
    corpus_docs: int = Field(3000, gt=0)

    @model_validator(mode="after")
    def _world_bounds(self) -> "SyntheticSpec":
        # the bounds the dataset step enforces (n_entities in [4, 5000], ...), from the one place that holds them
        from ldpipe.data.synthetic import SyntheticConfig
        from ldpipe.errors import DataValidationError

        try:
            SyntheticConfig(seed=self.seed, n_entities=self.n_entities, n_train=self.n_train, n_test=self.n_test,
                            corpus_docs=self.corpus_docs).validate()
        except DataValidationError as e:
            raise ValueError(f"{e.field}: {str(e).split(': ', 1)[-1]}") from None
        return self


class DatasetSpec(_Strict):
    kind: Literal["synthetic", "hh", "ultrafeedback", "local", "reference_probes"] = "synthetic"
    path: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    limit: int | None = Field(None, gt=0)
    synthetic: SyntheticSpec = SyntheticSpec()

    @model_validator(mode="after")
    def _path_needed(self) -> "DatasetSpec":
        if self.kind in ("local", "reference_probes") and not self.path:
            raise ValueError(f"dataset.kind '{self.kind}' needs dataset.path")
        return self


class LLMSpec(_Strict):
    """An OpenAI-compatible endpoint for LLM-made probe types (OpenAI, vLLM, llama.cpp, Ollama)."""

    model: str
    base_url: str | None = None          # None: OpenAI (or OPENAI_BASE_URL)
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key; the key never goes in YAML
    types: tuple[str, ...] = ("chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat",
                              "irr_hum")
    concurrency: int = Field(4, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0)
    timeout_s: float = Field(60, gt=0)   # per request, never more than what is left of max_call_s
    max_call_s: float = Field(60, gt=0)  # wall time per completion, all attempts and backoff included
    # A longer completion is cut to this many characters (the count is in the probe report); the default is the
    # dataset-text limit, ldpipe.data.loaders.MAX_TEXT_CHARS (tests/test_llm.py checks they agree).
    max_response_chars: int = Field(100_000, gt=0)
    max_attempts: int = Field(6, gt=0)
    use_batch_api: bool = False

    @field_validator("types")
    @classmethod
    def _types_known(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _known_types(v)


SELFR_TEMPLATE = "Please rephrase the following sentence: \n@@@ Original Sentence: {chosen}\n@@@ Rephrase: "


class ProbeGenerationSpec(_Strict):
    """How the base model makes y_init (its own reply) and y_selfr (its rephrase of y+)."""

    do_sample: bool = False            # False: greedy (deterministic); True: seeded sampling
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(16, gt=0)
    seed: int | None = None            # None: probes.seed
    selfr_template: str = SELFR_TEMPLATE   # the reference's HH prompt; {chosen} = y+ stripped
    stop: tuple[str, ...] = ("\n\nHuman:", "\n@@@")  # the output is cut at the first of these

    @field_validator("selfr_template")
    @classmethod
    def _has_chosen(cls, v: str) -> str:
        if "{chosen}" not in v:
            raise ValueError("selfr_template must contain the placeholder {chosen}")
        return v


CUSTOM_TRANSFORMS = ("shuffle_words", "reverse_words", "truncate", "template")
TEMPLATE_FIELDS = ("source", "chosen", "rejected", "prompt")


class CustomTypeSpec(_Strict):
    """A user-declared response type made deterministically from another type's rows."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    name: str
    source: str = Field("chosen", alias="from")   # a core type or an earlier custom type
    transform: Literal["shuffle_words", "reverse_words", "truncate", "template"]
    words: int | None = Field(None, gt=0)          # truncate: keep the first N words ...
    fraction: float | None = Field(None, gt=0, lt=1)  # ... or this share of them (at least one)
    text: str | None = None                        # template: placeholders {source} {chosen} {rejected} {prompt}

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"custom type name {v!r} must match {_NAME_RULE}")
        return v

    @model_validator(mode="after")
    def _params_fit(self) -> "CustomTypeSpec":
        given = {k for k in ("words", "fraction", "text") if getattr(self, k) is not None}
        allowed = {"truncate": {"words", "fraction"}, "template": {"text"}}.get(self.transform, set())
        extra = sorted(given - allowed)
        if extra:
            raise ValueError(f"custom type {self.name!r}: transform {self.transform!r} takes no {extra}")
        if self.transform == "truncate" and len(given) != 1:
            raise ValueError(f"custom type {self.name!r}: transform 'truncate' needs exactly one of words, fraction")
        if self.transform == "template":
            if not self.text:
                raise ValueError(f"custom type {self.name!r}: transform 'template' needs text")
            unknown = sorted(set(re.findall(r"{([A-Za-z_][A-Za-z0-9_]*)}", self.text)) - set(TEMPLATE_FIELDS))
            if unknown:
                raise ValueError(f"custom type {self.name!r}: text has unknown placeholder(s) {unknown}; "
                                 f"known: {list(TEMPLATE_FIELDS)}")
        return self


class ProbeSpec(_Strict):
    n_examples: int = Field(40, gt=0)
    selection: Literal["first", "random"] = "random"
    seed: int = 0
    types: tuple[str, ...] | None = None  # None: every type the data source and backends can make
    max_prompt_tokens: int = Field(96, gt=0)
    max_response_tokens: int = Field(64, gt=1)
    # auto: a model whose tokenizer has a chat template scores (and trains, and generates) prompts rendered by it;
    # none: the text as written (the reference's Human:/Assistant: format). ldpipe.model.encoding states the contract.
    chat_template: Literal["auto", "none"] = "auto"
    llm: LLMSpec | None = None  # LLM-made types; without it they come from the dataset's templates or are skipped
    generation: ProbeGenerationSpec = ProbeGenerationSpec()  # y_init / y_selfr from the base model
    custom_types: tuple[CustomTypeSpec, ...] = ()   # user-declared types, built after the core ones

    @field_validator("types")
    @classmethod
    def _types_known(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _known_types(v)

    @model_validator(mode="after")
    def _custom_types_valid(self) -> "ProbeSpec":
        seen: list[str] = []
        for i, ct in enumerate(self.custom_types):
            where = f"custom_types[{i}] (name {ct.name!r})"
            if ct.name in CORE_RESPONSE_TYPES:
                raise ValueError(f"{where}: name clashes with the core response type {ct.name!r}")
            if ct.name in seen:
                raise ValueError(f"{where}: duplicate name (custom_types[{seen.index(ct.name)}] has it too)")
            if ct.source not in CORE_RESPONSE_TYPES and ct.source not in seen:
                raise ValueError(f"{where}: from {ct.source!r} is not a core response type or an earlier custom "
                                 f"type; core: {list(CORE_RESPONSE_TYPES)}, earlier custom: {seen}")
            if self.types is not None and ct.source in CORE_RESPONSE_TYPES and ct.source not in self.types:
                raise ValueError(f"{where}: from {ct.source!r} is not among probes.types {list(self.types)}")
            seen.append(ct.name)
        return self


class ArchitectureSpec(_Strict):
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    max_position_embeddings: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArchitectureSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class PretrainSpec(_Strict):
    steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(128, gt=1)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(30, ge=0)
    seed: int = 0


class ModelSpec(_Strict):
    # builtin: a BPE tokenizer + small GPT-NeoX trained offline on a corpus (ldpipe.data.corpus): the synthetic world's
    # own corpus, a declared `corpus` file, or else the dataset's rows that are neither trained on nor probed.
    # pretrained: any HF model id or local path (Pythia, Qwen); loaded with local_files_only unless allow_download.
    kind: Literal["builtin", "pretrained"] = "builtin"
    name_or_path: str | None = None
    allow_download: bool = False
    corpus: str | None = None      # builtin: a .txt (documents split by blank lines) or .jsonl ("text") file
    vocab_size: int = Field(2048, ge=300)
    architecture: ArchitectureSpec = ArchitectureSpec()
    pretrain: PretrainSpec = PretrainSpec()

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelSpec":
        if self.kind == "pretrained" and not self.name_or_path:
            raise ValueError("model.kind 'pretrained' needs model.name_or_path")
        if self.kind == "pretrained" and self.corpus is not None:
            raise ValueError("model.corpus applies to model.kind 'builtin' only (a pretrained model is not "
                             "pretrained again)")
        if self.corpus is not None and not self.corpus.strip():
            raise ValueError("model.corpus is empty; give a file path or leave the key out")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        # an undeclared corpus stays out of the dump, so every config hash made before the key existed is kept
        out = handler(self)
        if isinstance(out, dict) and out.get("corpus") is None:
            out.pop("corpus", None)
        return out


EXTEND_SUPERVISE = "chosen+rejected"   # extend-SFT: train on y+ and y- (the paper's fix for squeezing)


class ScorerSpec(_Strict):
    """Ranks on-policy samples: a built-in reward function (ldpipe.training.rewards) or an OpenAI-compatible judge."""

    kind: Literal["reward", "judge"] = "reward"
    name: str | None = None              # reward: a name in ldpipe.training.rewards.REWARDS
    model: str | None = None             # judge: the endpoint's model name
    base_url: str | None = None          # judge: None means OpenAI (or OPENAI_BASE_URL)
    api_key_env: str = "OPENAI_API_KEY"  # judge: the NAME of the variable holding the key
    mode: Literal["pointwise", "pairwise"] = "pointwise"  # judge: a 1-10 score per sample, or A/B per pair
    criteria: str = "helpful, correct and relevant to the conversation"  # judge: what a good reply is
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(16, gt=0)
    concurrency: int = Field(4, gt=0)
    timeout_s: float = Field(60, gt=0)
    max_attempts: int = Field(6, gt=0)

    @model_validator(mode="after")
    def _kind_fields(self) -> "ScorerSpec":
        if self.kind == "reward":
            from ldpipe.training.rewards import REWARDS

            if self.name not in REWARDS:
                raise ValueError(f"scorer kind 'reward' needs name, one of {sorted(REWARDS)}; got {self.name!r}")
            if self.model is not None or self.base_url is not None:
                raise ValueError("scorer model/base_url apply to kind 'judge' only")
        elif not self.model:
            raise ValueError("scorer kind 'judge' needs model (and base_url for a local OpenAI-compatible server)")
        elif self.name is not None:
            raise ValueError("scorer name applies to kind 'reward' only")
        return self


class OnPolicySpec(_Strict):
    """On-policy DPO/IPO: each step samples `n_samples` replies per prompt of the batch from the current policy,
    scores them, and trains on (best, worst); prompts whose best and worst tie are skipped."""

    n_samples: int = Field(4, ge=2)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(48, gt=0)
    scorer: ScorerSpec = Field(default_factory=lambda: ScorerSpec(kind="reward", name="synthetic_facts"))


# RunSpec settings that do not change a run's trajectories: left out of its config hash, so changing them
# neither invalidates a resume checkpoint nor the stored rows.
RUN_HASH_EXCLUDE = ("checkpoint_every", "snapshot_every")


class LoraSpec(_Strict):
    """A LoRA adapter (peft) trained instead of every weight: checkpoints store the adapter, and influence is
    computed over the adapter's parameters only."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = None   # None: peft's default for the architecture


class RunSpec(_Strict):
    name: str
    algo: Literal["sft", "dpo", "ipo"] = "sft"
    supervise: str = "chosen"          # SFT target: any probe/response type, or "chosen+rejected"
    beta: float = Field(0.1, gt=0)     # DPO/IPO: strength of the implicit KL to the reference
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # DPO only; > 0 is cDPO
    start_from: str | None = None      # another run of this experiment whose final checkpoint this run starts
                                       # from (and, for DPO/IPO, uses as the reference model)
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(8, gt=0)   # SFT: sequences; DPO/IPO: (chosen, rejected) pairs
    lr: float = Field(5e-4, gt=0)
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    warmup_steps: int = Field(5, ge=0)
    autocast: Literal["auto", "bf16", "fp32"] = "auto"   # bf16 autocast of the forwards; auto: CUDA with bf16
    max_grad_norm: float | None = Field(10.0, gt=0)
    eval_every: int = Field(10, gt=0)   # optimizer steps between probe evaluations (plus step 0 and the last)
    seed: int = 0
    n_train: int | None = Field(None, gt=0)   # cap on training prompts (None: the whole train split)
    # Resume checkpoints (model, optimizer, scheduler, RNG, step) every N optimizer steps, so a killed run
    # continues where it stopped (None: every eval_every steps; 0: none). Not in the config hash.
    checkpoint_every: int | None = Field(None, ge=0)
    # Model-only HF checkpoints <run_dir>/checkpoints/step-NNNNNNN at step 0, every N steps and the last step,
    # for analyses over several checkpoints (None: none). Not in the config hash.
    snapshot_every: int | None = Field(None, gt=0)
    pairs: Literal["offline", "on_policy"] = "offline"  # DPO/IPO: the dataset's pairs, or sampled each step
    on_policy: OnPolicySpec | None = None     # settings for pairs: on_policy (None: the defaults)
    trainer: Literal["ldpipe", "trl"] = "ldpipe"   # trl: TRL's SFTTrainer/DPOTrainer with ldpipe's tracking callback
    lora: LoraSpec | None = None              # train a LoRA adapter (peft) instead of every weight

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"run name {v!r} must match {_NAME_RULE}")
        return v

    @model_validator(mode="after")
    def _algo_settings(self) -> "RunSpec":
        if self.algo != "sft" and self.supervise != "chosen":
            raise ValueError(f"run {self.name!r}: supervise applies to algo 'sft' only; {self.algo} trains on "
                             "the train split's (chosen, rejected) pairs")
        if self.algo != "dpo" and self.label_smoothing:
            raise ValueError(f"run {self.name!r}: label_smoothing (cDPO) applies to algo 'dpo' only")
        if self.pairs == "on_policy" and self.algo not in ("dpo", "ipo"):
            raise ValueError(f"run {self.name!r}: pairs 'on_policy' applies to algo 'dpo' or 'ipo', not {self.algo!r}")
        if self.on_policy is not None and self.pairs != "on_policy":
            raise ValueError(f"run {self.name!r}: on_policy settings need pairs: on_policy")
        if "+" in self.supervise and self.supervise != EXTEND_SUPERVISE:
            raise ValueError(f"run {self.name!r}: supervise {self.supervise!r}: the only combined target is "
                             f"{EXTEND_SUPERVISE!r}")
        if self.supervise != EXTEND_SUPERVISE and self.supervise not in CORE_RESPONSE_TYPES:
            raise ValueError(f"run {self.name!r}: supervise {self.supervise!r} is not a response type; known: "
                             f"{list(CORE_RESPONSE_TYPES)} or {EXTEND_SUPERVISE!r}")
        return self

    @model_validator(mode="after")
    def _trl_supports(self) -> "RunSpec":
        if self.trainer != "trl":
            return self
        unsupported = {"pairs": self.pairs == "on_policy", "snapshot_every": self.snapshot_every is not None}
        for key, bad in unsupported.items():
            if bad:
                raise ValueError(f"run {self.name!r}: trainer 'trl' does not support {key} "
                                 f"({'on-policy pairs' if key == 'pairs' else 'model snapshots'}); "
                                 "use trainer 'ldpipe' for it")
        return self

    def steps_per_epoch(self, n_examples: int) -> int:
        """Optimizer steps of one pass over `n_examples` (the last batch may be short)."""
        return math.ceil(n_examples / self.batch_size)

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps of the whole run over `n_examples` training examples (at least one)."""
        return max(1, round(self.epochs * self.steps_per_epoch(n_examples)))

    @property
    def on_policy_settings(self) -> OnPolicySpec:
        """The on-policy settings (declared or default); meaningful only for pairs: on_policy."""
        return self.on_policy or OnPolicySpec()

    @property
    def supervised_types(self) -> tuple[str, ...]:
        """The response types an SFT run raises ("chosen+rejected" -> both)."""
        return tuple(self.supervise.split("+"))


class JudgeSpec(_Strict):
    """An OpenAI-compatible judge endpoint for win rates (the key is read from `api_key_env`, never stored)."""

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(4, gt=0)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(256, gt=0)
    timeout_s: float = Field(60, gt=0)
    max_attempts: int = Field(6, gt=0)


_CKPT_REF = re.compile(r"^(base|[a-z][a-z0-9_]{0,40}(@(start|final|step-[0-9]+))?)$")


class WinRateSpec(_Strict):
    judge: JudgeSpec | None = None       # None: the win-rate asset is skipped with a reason
    # [a, b] checkpoint references: "base", "<run>" (final), "<run>@start", "<run>@step-XXXXXXX"
    pairs: tuple[tuple[str, str], ...] = ()
    n_prompts: int = Field(16, gt=0)     # held-out (test split) prompts, each judged in both A/B orders

    @field_validator("pairs")
    @classmethod
    def _refs_ok(cls, v: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for a, b in v:
            for ref in (a, b):
                if not _CKPT_REF.match(ref):
                    raise ValueError(f"checkpoint reference {ref!r}: use base, <run>, <run>@start, <run>@final "
                                     "or <run>@step-XXXXXXX")
            if a == b:
                raise ValueError(f"pair [{a!r}, {b!r}] compares a checkpoint with itself")
        return v


class GenerationSpec(_Strict):
    """Generation-based analyses (squeezing, borrowing, win rate): sizes kept small for a CPU."""

    enabled: bool = True                   # false: no squeezing/borrowing/win_rate assets (the toy stays)
    n_prompts: int = Field(24, gt=0)       # per split: probe (trained) prompts and held-out test prompts
    max_new_tokens: int = Field(48, gt=0)  # greedy decoding, stops at EOS
    batch_size: int = Field(16, gt=0)
    repeat_ngram: int = Field(3, gt=0)     # repeater rate: some word n-gram occurs >= 2 times in a generation
    borrow_ngram: int = Field(3, gt=0)     # borrowing: word n-grams compared with training answers
    snapshots: bool = True                 # also analyse runs/<run>/checkpoints/step-* when present
    win_rate: WinRateSpec = WinRateSpec()


class CurvesSpec(_Strict):
    """Learning-curve plots."""

    ema: float | None = Field(None, gt=0, lt=1)   # EMA smoothing of the plotted curves (the paper uses 0.9)


class InfluenceSpec(_Strict):
    """Cross-example influence (eNTK) analyses; defaults sized to about a minute on 2 CPU cores."""

    enabled: bool = True
    runs: tuple[str, ...] | None = None      # None: every declared run
    checkpoints: tuple[Literal["start", "snapshots", "final"], ...] = ("start", "snapshots", "final")
    max_snapshots: int = Field(1, ge=0)      # evenly spaced among <run_dir>/checkpoints/step-* (always the last)
    n_train: int = Field(6, gt=0)            # training examples (rows of the matrix)
    n_probe_prompts: int = Field(3, gt=0)    # probe prompts observed (every type of each)
    observed_types: tuple[str, ...] | None = None   # None: every probe type
    methods: tuple[Literal["exact", "projected", "naive", "naive_optimizer"], ...] = (
        "exact", "projected", "naive", "naive_optimizer")
    rank: int = Field(128, gt=0)             # projected: per-side rank of the factored projection
    n_naive: int = Field(2, gt=0)            # training examples validated by a real one-step update
    n_akg: int = Field(2, gt=0)              # training examples given an A-K-G decomposition
    heatmap_types: tuple[str, ...] | None = None    # trained-on types of the heat map (None: every probe type)
    min_spearman: float = Field(0.9, ge=-1, le=1)   # asset check: projected vs exact
    seed: int = 0
    threads: int = Field(1, gt=0)            # torch CPU threads while these run (1: safest on a shared small CPU)


class ExperimentSpec(_Strict):
    name: str
    description: str = ""
    # false: a study run on request (`ldpipe run -e <name>`, the UI, `dg launch --job <name>_pipeline`), not by a
    # plain `ldpipe run` or the nightly schedule
    run_by_default: bool = True
    dataset: DatasetSpec = DatasetSpec()
    probes: ProbeSpec = ProbeSpec()
    model: ModelSpec = ModelSpec()
    runs: tuple[RunSpec, ...] = ()
    generation_analysis: GenerationSpec = GenerationSpec()   # squeezing / borrowing / win-rate analyses
    influence: InfluenceSpec = InfluenceSpec()      # eNTK influence matrix, A-K-G, heat map
    curves: CurvesSpec = CurvesSpec()               # learning-curve plots (EMA smoothing)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"experiment name {v!r} must match {_NAME_RULE}")
        return v

    @model_validator(mode="after")
    def _unique_runs(self) -> "ExperimentSpec":
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate run name(s) {dup}")
        return self

    @model_validator(mode="after")
    def _chains_valid(self) -> "ExperimentSpec":
        by_name = {r.name: r for r in self.runs}
        for r in self.runs:
            if r.start_from is not None and r.start_from not in by_name:
                raise ValueError(f"run {r.name!r}: start_from {r.start_from!r} is not a run of this experiment; "
                                 f"runs: {sorted(by_name)}")
        for r in self.runs:
            parent = by_name.get(r.start_from) if r.start_from else None
            if parent is not None and parent.lora is not None and r.lora != parent.lora:
                raise ValueError(f"run {r.name!r}: lora must equal its start_from run {parent.name!r}'s "
                                 f"({parent.lora.model_dump()}): a chain trains one adapter")
        for r in self.runs:
            chain = [r.name]
            while by_name[chain[-1]].start_from is not None:
                nxt = by_name[chain[-1]].start_from
                if nxt in chain:
                    raise ValueError(f"start_from forms a cycle: {' -> '.join(chain[chain.index(nxt):] + [nxt])}")
                chain.append(nxt)
        return self

    @model_validator(mode="after")
    def _win_rate_runs_exist(self) -> "ExperimentSpec":
        runs = {r.name for r in self.runs}
        for pair in self.generation_analysis.win_rate.pairs:
            for ref in pair:
                if ref != "base" and ref.split("@")[0] not in runs:
                    raise ValueError(f"generation_analysis.win_rate.pairs: {ref!r} names no run of this experiment; "
                                     f"runs: {sorted(runs)} (or 'base')")
        return self

    @model_validator(mode="after")
    def _influence_runs_exist(self) -> "ExperimentSpec":
        unknown = [r for r in self.influence.runs or () if r not in {x.name for x in self.runs}]
        if unknown:
            raise ValueError(f"influence.runs: {unknown} name no run of this experiment; "
                             f"runs: {sorted(x.name for x in self.runs)}")
        return self

    def run(self, name: str) -> RunSpec:
        for r in self.runs:
            if r.name == name:
                return r
        raise SpecError(f"experiment {self.name!r} has no run {name!r}; runs: {[r.name for r in self.runs]}")

    def run_id(self, run: RunSpec) -> str:
        return f"{self.name}.{run.name}"

    def parent(self, run: RunSpec) -> RunSpec | None:
        """The run whose final checkpoint `run` starts from (None: the base model)."""
        return self.run(run.start_from) if run.start_from is not None else None

    def run_config_hash(self, run: RunSpec, *, parent_hash: str | None = None) -> str:
        """Hash of everything that determines a run's trajectories.

        A chained run includes its parent's hash (recursively, so the whole chain), by default the
        declared parent's; `parent_hash` substitutes the hash the parent checkpoint was actually
        trained with (e.g. a launch-time override).
        """
        body: dict[str, Any] = {"dataset": self.dataset, "probes": self.probes_hash_part(), "model": self.model,
                                "run": run.model_dump(mode="json", exclude=set(RUN_HASH_EXCLUDE) | (
                                    {"pairs", "on_policy"} if run.pairs == "offline" else set()) | (
                                    {"autocast"} if run.autocast == "auto" else set()) | (
                                    {"trainer"} if run.trainer == "ldpipe" else set()) | (
                                    {"lora"} if run.lora is None else set()))}
        # (defaults added later - offline pairs, autocast "auto", trainer "ldpipe", no lora - stay out: hashes stay
        # as they were before them)
        if self.model.kind == "builtin" and self.model.corpus is None and self.dataset.kind != "synthetic":
            # the base model's corpus rule (whole dialogues, never EOS right after "Assistant:") changes the model a
            # run starts from, so a run (and its resume checkpoints) of an older base model is not continued
            from ldpipe.data.corpus import DATASET_CORPUS_RULE

            body["corpus_rule"] = DATASET_CORPUS_RULE
        if self.model.kind != "builtin":
            # BOS and chat templates came with encoding version 2: runs of outside models scored before it differ
            from ldpipe.model.encoding import ENCODING_VERSION

            body["encoding"] = ENCODING_VERSION
        parent = self.parent(run)
        if parent is not None:
            body["parent"] = parent_hash or self.run_config_hash(parent)
        return config_hash(body)

    def probes_hash_part(self) -> dict[str, Any]:
        """The probe settings in a hash; `chat_template: auto`, the default, stays out (the builtin model has no
        template, so its runs score as before the key existed, and keep their hashes)."""
        return self.probes.model_dump(mode="json", exclude={"chat_template"} if self.probes.chat_template == "auto"
                                      else set())

    def model_config_hash(self) -> str:
        parts: dict[str, Any] = {"dataset": self.dataset, "model": self.model}
        if self.dataset.kind == "synthetic":
            # the built-in corpus changes with the generator's version, and the base model must follow it
            from ldpipe.data.synthetic import CORPUS_VERSION

            parts["corpus_version"] = CORPUS_VERSION
        if self.model.kind == "builtin":
            parts.update(self.corpus_recipe())
        return config_hash(parts)

    def corpus_recipe(self) -> dict[str, Any]:
        """What decides a builtin model's corpus beyond dataset and model (hash parts; empty for the synthetic
        world's own corpus, so those hashes are as before this key existed)."""
        if self.model.corpus is not None:
            from ldpipe.data.corpus import file_digest  # a changed corpus file is a new base model

            return {"corpus_file": file_digest(self.model.corpus)}
        if self.dataset.kind == "synthetic":
            return {}
        from ldpipe.data.corpus import DATASET_CORPUS_RULE   # whole dialogues, never EOS right after "Assistant:"

        caps = [r.n_train for r in self.runs]
        p = self.probes
        return {"corpus_excludes": {"probes": [p.n_examples, p.selection, p.seed, p.types],
                                    "train_rows": 0 if not caps else None if None in caps else max(caps)},
                "corpus_rule": DATASET_CORPUS_RULE}


from ldpipe.hashing import config_hash  # noqa: E402,F401  (re-exported: `from ldpipe.spec import config_hash`)


def _format_errors(err: ValidationError, data: Any = None) -> str:
    lines = []
    for e in err.errors():
        loc = _named_loc(e["loc"], data) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _named_loc(loc: tuple, data: Any) -> str:
    """`runs[sft_long].lr` for pydantic's ('runs', 1, 'lr') where the list item has a name, else `runs.1.lr`."""
    parts, node = [], data
    for p in loc:
        item = node[p] if isinstance(node, list) and isinstance(p, int) and p < len(node) else (
            node.get(p) if isinstance(node, dict) else None)
        name = item.get("name") if isinstance(p, int) and isinstance(item, dict) else None
        if isinstance(name, str) and parts:
            parts[-1] += f"[{name}]"
        else:
            parts.append(str(p))
        node = item
    return ".".join(parts)


def parse_experiment(data: Any, *, source: str) -> ExperimentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: invalid experiment declaration:\n{_format_errors(e, data)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (plain YAML keeps the last one silently: a second
    `runs:` would replace the first, a repeated `lr:` would change the run)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:        # an unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_MAX_YAML_DEPTH = 50   # declarations nest a few levels; deeper is a mistake (and would overflow the parser)


def _yaml_depth(text: str) -> int:
    depth = best = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            best = max(best, depth)
            if best > _MAX_YAML_DEPTH:
                return best
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return best


def load_experiment(path: Path) -> ExperimentSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    except OSError as e:   # a directory named x.yaml, a symlink loop, no permission, ...
        raise SpecError(f"{path}: cannot read the declaration: {e.strerror or e}") from None
    try:
        if _yaml_depth(text) > _MAX_YAML_DEPTH:
            raise SpecError(f"{path}: nested more than {_MAX_YAML_DEPTH} levels deep; a declaration needs a few")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.constructor.ConstructorError as e:   # e.g. a duplicate key
        raise SpecError(f"{path}: YAML error: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: YAML syntax error: {e}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to parse") from None
    return parse_experiment(data, source=str(path))


def load_experiments(directory: Path) -> list[ExperimentSpec]:
    """All declarations in `directory` (*.yaml, *.yml), sorted by file name; names must be unique."""
    if not directory.is_dir():
        raise SpecError(f"declarations directory {directory} does not exist")
    specs: list[ExperimentSpec] = []
    seen: dict[str, Path] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        spec = load_experiment(path)
        if spec.name in seen:
            raise SpecError(f"{path}: experiment name {spec.name!r} is already declared in {seen[spec.name]}")
        seen[spec.name] = path
        specs.append(spec)
    return specs


# Launch-time presets: a preset caps these RunSpec fields at the given values (a declared value already
# below the cap is kept). "smoke" is a quick end-to-end check of a run (a few optimizer steps, probes scored
# every 2 steps); "full" is the declaration as written.
RUN_PRESETS: dict[str, dict[str, float | int]] = {
    "smoke": {"n_train": 16, "epochs": 1.0, "eval_every": 2, "warmup_steps": 1},
    "full": {},
}


def apply_run_overrides(run: RunSpec, overrides: dict[str, Any] | None) -> RunSpec:
    """`run` with launch-time overrides: first `overrides["preset"]` (a RUN_PRESETS name), then every other
    non-null field; the result is validated like a declaration (a bad value names the run and the field)."""
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = changes.pop("preset", None)
    data = run.model_dump()
    if preset is not None:
        if preset not in RUN_PRESETS:
            raise SpecError(f"run {run.name!r}: unknown preset {preset!r}; presets: {sorted(RUN_PRESETS)}")
        for key, cap in RUN_PRESETS[preset].items():
            data[key] = cap if data.get(key) is None else min(data[key], cap)
    unknown = sorted(set(changes) - set(data))
    if unknown:
        raise SpecError(f"run {run.name!r}: unknown override(s) {unknown}")
    data.update(changes)
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"run {run.name!r}: invalid launch-time override:\n{_format_errors(e)}") from None
