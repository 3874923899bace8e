"""Experiment declarations: the YAML files in assets/ parsed into typed, validated specs.

Every model forbids unknown keys, so a typo ("learning_rate" for "lr") is an error
naming the file and the key path instead of a silently ignored setting.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ldpipe.errors import SpecError

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSpec(_Strict):
    seed: int = 0
    n_entities: int = Field(60, gt=0)
    n_train: int = Field(200, gt=0)
    n_test: int = Field(50, gt=0)
    corpus_docs: int = Field(3000, gt=0)


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
    timeout_s: float = Field(60, gt=0)
    max_attempts: int = Field(6, gt=0)
    use_batch_api: bool = False


class ProbeSpec(_Strict):
    n_examples: int = Field(40, gt=0)
    selection: Literal["first", "random"] = "random"
    seed: int = 0
    types: tuple[str, ...] | None = None  # None: every type the data source and backends can make
    max_prompt_tokens: int = Field(96, gt=0)
    max_response_tokens: int = Field(64, gt=1)
    llm: LLMSpec | None = None  # LLM-made types; without it they come from the dataset's templates or are skipped


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
    # builtin: a BPE tokenizer + small GPT-NeoX trained offline on the built-in corpus.
    # pretrained: any HF model id or local path (Pythia, Qwen); loaded with local_files_only unless allow_download.
    kind: Literal["builtin", "pretrained"] = "builtin"
    name_or_path: str | None = None
    allow_download: bool = False
    vocab_size: int = Field(2048, ge=300)
    architecture: ArchitectureSpec = ArchitectureSpec()
    pretrain: PretrainSpec = PretrainSpec()

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelSpec":
        if self.kind == "pretrained" and not self.name_or_path:
            raise ValueError("model.kind 'pretrained' needs model.name_or_path")
        return self


EXTEND_SUPERVISE = "chosen+rejected"   # extend-SFT: train on y+ and y- (the paper's fix for squeezing)


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
    max_grad_norm: float | None = Field(10.0, gt=0)
    eval_every: int = Field(10, gt=0)   # optimizer steps between probe evaluations (plus step 0 and the last)
    seed: int = 0
    n_train: int | None = Field(None, gt=0)   # cap on training prompts (None: the whole train split)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"run name {v!r} must match {_NAME.pattern}")
        return v

    @model_validator(mode="after")
    def _algo_settings(self) -> "RunSpec":
        if self.algo != "sft" and self.supervise != "chosen":
            raise ValueError(f"run {self.name!r}: supervise applies to algo 'sft' only; {self.algo} trains on "
                             "the train split's (chosen, rejected) pairs")
        if self.algo != "dpo" and self.label_smoothing:
            raise ValueError(f"run {self.name!r}: label_smoothing (cDPO) applies to algo 'dpo' only")
        if "+" in self.supervise and self.supervise != EXTEND_SUPERVISE:
            raise ValueError(f"run {self.name!r}: supervise {self.supervise!r}: the only combined target is "
                             f"{EXTEND_SUPERVISE!r}")
        return self

    @property
    def supervised_types(self) -> tuple[str, ...]:
        """The response types an SFT run raises ("chosen+rejected" -> both)."""
        return tuple(self.supervise.split("+"))


class ExperimentSpec(_Strict):
    name: str
    description: str = ""
    dataset: DatasetSpec = DatasetSpec()
    probes: ProbeSpec = ProbeSpec()
    model: ModelSpec = ModelSpec()
    runs: tuple[RunSpec, ...] = ()

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"experiment name {v!r} must match {_NAME.pattern}")
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
            chain = [r.name]
            while by_name[chain[-1]].start_from is not None:
                nxt = by_name[chain[-1]].start_from
                if nxt in chain:
                    raise ValueError(f"start_from forms a cycle: {' -> '.join(chain[chain.index(nxt):] + [nxt])}")
                chain.append(nxt)
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
        body: dict[str, Any] = {"dataset": self.dataset, "probes": self.probes, "model": self.model, "run": run}
        parent = self.parent(run)
        if parent is not None:
            body["parent"] = parent_hash or self.run_config_hash(parent)
        return config_hash(body)

    def model_config_hash(self) -> str:
        parts: dict[str, Any] = {"dataset": self.dataset, "model": self.model}
        if self.dataset.kind == "synthetic":
            # the built-in corpus changes with the generator's version, and the base model must follow it
            from ldpipe.synthetic import CORPUS_VERSION

            parts["corpus_version"] = CORPUS_VERSION
        return config_hash(parts)


def config_hash(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        raise TypeError(type(o))

    blob = json.dumps(obj, default=default, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_experiment(data: Any, *, source: str) -> ExperimentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: invalid experiment declaration:\n{_format_errors(e)}") from None


def load_experiment(path: Path) -> ExperimentSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: YAML syntax error: {e}") from None
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
