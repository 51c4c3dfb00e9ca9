"""Options of the callbacks, validated when they are built, and their command-line / YAML form.

- `DynamicsConfig`: the options of `LearningDynamicsCallback`; every field is checked at construction (type, range,
  combination), so a bad value fails before training with the option named and the fix, never at the first
  analysed step.
- `DynamicsArguments`: the same options as a dataclass that `transformers.HfArgumentParser` and `trl.TrlParser`
  parse next to `DPOConfig`, `GRPOConfig`, `SFTConfig` and `ModelConfig` (every name prefixed `ntk_`, so nothing
  clashes with the trainer's `--seed`, `--output_dir` or `--report_to`); `to_config()` gives the `DynamicsConfig`.
- `NTHRConfig`: the options of `NTHRCallback`.
- `check_writable_dir`: the output-folder check the callback runs at construction.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import numbers
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from trl_ntk.ntk.nthr import Vocab, check_weight_options

ATTRIBUTION_LEVELS = ("none", "sums", "tokens")
MEMORY_CHECKS = ("downgrade", "refuse", "off")
"""Values of `DynamicsConfig.attribution`."""

REPORT_TO_VALUES = ("none", "all", "wandb", "tensorboard", "trackio")
"""`report_to` values the callback has a sink for (`"all"`: those installed); transformers' other integrations are
accepted and ignored by the sinks."""

HiddenSource = Literal["auto", "old_logps", "generation", "forward"]


# ---- checks -----------------------------------------------------------------------------------------------------


def check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False, hint: str = "") -> None:
    """Raise `TypeError` unless `value` is an integer (not a bool, not a str, not a float such as `2.5`), and
    `ValueError` when it is below `minimum`; `None` passes when `optional`."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        example = "5" if minimum is None or minimum <= 5 else str(minimum)
        raise TypeError(
            f"{name} must be an int{' or None' if optional else ''}, got {value!r} ({type(value).__name__}); "
            f"pass a whole number, e.g. {name}={example}"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{'; ' + hint if hint else ''}")


def check_float(name: str, value: Any, *, positive: bool = False, hint: str = "") -> None:
    """Raise `TypeError` unless `value` is a real number, `ValueError` when it is not finite (or not > 0 when
    `positive`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}{'; ' + hint if hint else ''}")


def check_bool(name: str, value: Any) -> None:
    """Raise `TypeError` unless `value` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_writable_dir(path: str | os.PathLike, option: str = "output_dir") -> Path:
    """Create the folder `path` (and its parents) and write, then delete, a temporary file in it.

    Raises `ValueError` naming `option` when the folder cannot be created or written (read-only file system, no
    permission, a file in the way, a full disk), so that a run never analyses at full cost and writes nothing.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as error:
        raise ValueError(
            f"{option} {str(folder)!r} is not a writable folder ({type(error).__name__}: {error}); pass "
            f"{option}=... naming a folder this process can write"
        ) from error
    return folder


def _check_report_to(value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list | tuple) and all(isinstance(name, str) for name in value):
        return
    raise TypeError(
        f"report_to must be a str, a list of str or None, got {value!r}; e.g. report_to='wandb' or "
        "report_to=['wandb', 'tensorboard']"
    )


# ---- optional dependencies ----------------------------------------------------------------------------------------

OPTIONAL_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "wandb": ("wandb", "pip install 'trl-ntk[wandb]'"),
    "tensorboard": ("tensorboard", "pip install 'trl-ntk[tensorboard]'"),
    "trackio": ("trackio", "pip install trackio"),
    "report": ("plotly", "pip install 'trl-ntk[report]'"),
    "heatmaps": ("matplotlib", "pip install 'trl-ntk[report]'"),
}
"""What each feature imports, and the one-line fix when it is missing."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dashboard_names(report_to: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The dashboards among transformers' `report_to` values that the sinks write to (`"all"`: none is required,
    the installed ones are used)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in names:
        return []
    return [name for name in ("wandb", "tensorboard", "trackio") if name in names]


def check_optional_dependencies(
    report_to: str | list[str] | tuple[str, ...] | None = None, *, report: bool = False, heatmaps: bool = False
) -> None:
    """Raise `ImportError` naming every missing package the chosen options need, each with its `pip install` line.

    Args:
        report_to: transformers' `report_to` (`"wandb"`, `"tensorboard"`, `"trackio"`, a list, `"all"`, `"none"`).
        report: whether the HTML report will be built (`plotly`).
        heatmaps: whether attribution heat maps go to a dashboard (`matplotlib`).
    """
    needed = dashboard_names(report_to)
    if report:
        needed.append("report")
    if heatmaps and dashboard_names(report_to):
        needed.append("heatmaps")
    missing = [name for name in needed if not _installed(OPTIONAL_DEPENDENCIES[name][0])]
    if missing:
        lines = [f"  {OPTIONAL_DEPENDENCIES[n][0]} (for {n}): {OPTIONAL_DEPENDENCIES[n][1]}" for n in missing]
        raise ImportError(
            "missing optional dependencies for the chosen options:\n"
            + "\n".join(lines)
            + "\nInstall them (or drop the dashboard from report_to)."
        )


# ---- log visibility ---------------------------------------------------------------------------------------------

_HANDLER_FLAG = "_trl_ntk_handler"


def follow_trainer_log_level(args: Any) -> int:
    """Make the package's INFO lines (analysis progress, the per-analysis summary) show at the trainer's log level.

    The `trl_ntk` logger takes the level the trainer gives this process (`args.get_process_log_level()`), except that
    the default `log_level="passive"` shows INFO on the main process; `log_level="warning"` (or higher) hides the
    lines, `log_level_replica` rules the other processes. When the application has configured no logging (no root
    handler), one stderr handler prefixed `[trl_ntk]` is added (once). Returns the level set.
    """
    level = args.get_process_log_level() if hasattr(args, "get_process_log_level") else logging.INFO
    if getattr(args, "log_level", "passive") == "passive" and getattr(args, "should_log", True):
        level = min(level, logging.INFO)
    package_logger = logging.getLogger("trl_ntk")
    package_logger.setLevel(level)
    has_handler = any(getattr(h, _HANDLER_FLAG, False) for h in package_logger.handlers)
    if not has_handler and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[trl_ntk] %(message)s"))
        setattr(handler, _HANDLER_FLAG, True)
        package_logger.addHandler(handler)
    return level


# ---- LearningDynamicsCallback ------------------------------------------------------------------------------------


@dataclass
class DynamicsConfig:
    """Options of `LearningDynamicsCallback`, logged as run config; every field is validated at construction.

    Args:
        every_n_steps (`int`, *optional*, defaults to `50`): score the probes (and analyse the update) at every
            optimizer step whose `global_step` is a multiple of this, and at the end of training.
        attribution (`str`, *optional*, defaults to `"sums"`): `"none"` (track probe log-probs only, a few no-grad
            forwards), `"sums"` (predicted vs observed change, sign / group splits: a few backwards and JVPs) or
            `"tokens"` (adds, for every probe response, each training token's total push and the top-k pushing
            tokens: one probe backward + one batch JVP per response; and the full probe-token x training-token
            matrix for the responses of the first `matrix_prompts` probe prompts: about one batch JVP per token).
        tokens_every_n_steps (`int`, *optional*): with `attribution="sums"`, run the `"tokens"` level on the
            analysis steps that are multiples of this.
        matrix_prompts (`int`, *optional*, defaults to `1`): at the tokens level, keep the full token x token
            matrix (`.npz`) for the responses of this many probe prompts; `None`: for every response (the cost
            then grows with the probe tokens, e.g. about 100 s of CPU per step for the demo's 1,400 probe tokens).
        matrix_every_n_steps (`int`, *optional*, defaults to `1000`): compute that matrix at the first tokens-level
            analysis of the run and at those whose step is a multiple of this; `None`: at every tokens-level
            analysis. The matrix costs about one batch JVP per probe token of those responses (the toy DPO: 65
            plain training steps for 178 tokens), against one per response for the totals, which every
            tokens-level analysis computes; at every 50 steps this default keeps the tokens level within 1.5x of
            plain training on the toy runs (`benchmarks/bench_overhead.py`).
        num_prompts (`int`, *optional*, defaults to `4`): prompts taken from the train dataset for default probes.
        generate (`bool`, *optional*, defaults to `True`): track the model's own greedy response per probe prompt,
            regenerated at every scoring step (kind `greedy`).
        num_samples (`int`, *optional*, defaults to `0`): also track this many sampled responses per prompt.
        sample_temperature (`float`, *optional*, defaults to `1.0`): temperature of those samples.
        max_new_tokens (`int`, *optional*, defaults to `48`): generation length for sampled probes (capped at a
            GRPO trainer's `max_completion_length`).
        top_k (`int`, *optional*, defaults to `5`): training tokens listed per probe response ("tokens" level).
        chunk_size (`int`, *optional*): parameter-sized tangents held at once by the kernels.
        score_batch_size (`int`, *optional*, defaults to `32`): probe responses per scoring forward.
        kernel_summaries (`bool`, *optional*, defaults to `False`): log-prob kernel and pNTK norms between probes
            and the batch at "tokens" steps (two more `min(Mp, L)`-JVP passes).
        strict (`bool`, *optional*, defaults to `False`): raise analysis failures instead of warning and counting.
        memory_check (`str`, *optional*, defaults to `"downgrade"`): before the first analysis, estimate its peak
            extra memory on the device (`analysis.memory`) and, when it does not fit, `"downgrade"` (a lower
            level, or finite-difference JVPs, with a warning) or `"refuse"` (raise before training); `"off"`.
        low_memory (`bool`, *optional*, defaults to `False`): one parameter-sized tangent at a time (unless
            `chunk_size` is given) and, at the "sums" level, every JVP by finite differences (the memory of a
            no-grad forward with the model's own attention kernel, about 1e-4 relative error); when some step runs
            the "tokens" level, exact JVPs with `jvp_chunk_size="buffer"` (`analysis.dense.DenseBackend`: gradients
            plus JVP activations within `chunk_size + 1` parameter-sized buffers, the same results), or finite
            differences where the memory check finds that only those fit; slower.
        seed (`int`, *optional*, defaults to `0`): probe selection and sampling seed.
        output_dir (`str`, *optional*): where `dynamics.jsonl` goes; defaults to `<args.output_dir>/dynamics`.
        report_to (`str` or `list[str]`, *optional*): trackers besides the JSONL; defaults to the trainer's
            `args.report_to`.

    Raises:
        `TypeError`: a field of the wrong type (`every_n_steps="5"`, `every_n_steps=2.5`, ...).
        `ValueError`: a value out of range (`score_batch_size=0`, `top_k=-1`, `sample_temperature=0`, ...) or
            options that contradict each other (`num_samples` without `generate`, ...).
    """

    every_n_steps: int = 50
    attribution: str = "sums"
    tokens_every_n_steps: int | None = None
    matrix_prompts: int | None = 1
    matrix_every_n_steps: int | None = 1000
    num_prompts: int = 4
    generate: bool = True
    num_samples: int = 0
    sample_temperature: float = 1.0
    max_new_tokens: int = 48
    top_k: int = 5
    chunk_size: int | None = None
    score_batch_size: int = 32
    kernel_summaries: bool = False
    strict: bool = False
    memory_check: str = "downgrade"
    low_memory: bool = False
    seed: int = 0
    output_dir: str | None = None
    report_to: str | list[str] | None = None

    def __post_init__(self) -> None:
        check_int("every_n_steps", self.every_n_steps, minimum=1, hint="use 1 to analyse every optimizer step")
        check_choice("attribution", self.attribution, ATTRIBUTION_LEVELS)
        check_int("tokens_every_n_steps", self.tokens_every_n_steps, minimum=1, optional=True)
        check_int("matrix_prompts", self.matrix_prompts, minimum=1, optional=True, hint="None keeps every prompt")
        check_int(
            "matrix_every_n_steps",
            self.matrix_every_n_steps,
            minimum=1,
            optional=True,
            hint="None computes the matrix at every tokens-level analysis",
        )
        check_int("num_prompts", self.num_prompts, minimum=1)
        check_bool("generate", self.generate)
        check_int("num_samples", self.num_samples, minimum=0)
        check_float("sample_temperature", self.sample_temperature, positive=True, hint="1.0 samples the policy")
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_int("top_k", self.top_k, minimum=0)
        check_int("chunk_size", self.chunk_size, minimum=1, optional=True, hint="None lets the kernels choose")
        check_int("score_batch_size", self.score_batch_size, minimum=1)
        check_bool("kernel_summaries", self.kernel_summaries)
        check_bool("strict", self.strict)
        check_choice("memory_check", self.memory_check, MEMORY_CHECKS)
        check_bool("low_memory", self.low_memory)
        check_int("seed", self.seed)
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            raise TypeError(f"output_dir must be a str or a path, got {self.output_dir!r}")
        _check_report_to(self.report_to)
        if isinstance(self.report_to, tuple):
            self.report_to = list(self.report_to)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.tokens_every_n_steps is not None and self.attribution != "sums":
            raise ValueError(
                f"tokens_every_n_steps applies to attribution='sums' only (got attribution={self.attribution!r}): "
                "drop it, or set attribution='sums'"
            )
        if self.num_samples > 0 and not self.generate:
            raise ValueError(
                f"num_samples={self.num_samples} needs generate=True (samples are drawn with the greedy responses)"
            )
        if self.kernel_summaries and self.attribution == "none":
            raise ValueError(
                "kernel_summaries are computed at 'tokens' steps; with attribution='none' there are none: set "
                "attribution='tokens' (or 'sums' with tokens_every_n_steps) or drop kernel_summaries"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (the `config` of the `run` record)."""
        return asdict(self)

    @property
    def tokens_level(self) -> bool:
        """Whether some analysed step runs the `"tokens"` level (attribution matrices, heat maps)."""
        return self.attribution == "tokens" or self.tokens_every_n_steps is not None


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DynamicsArguments:
    """`LearningDynamicsCallback`'s options for `HfArgumentParser` / `TrlParser` (command line and YAML `--config`).

    Every name is the `DynamicsConfig` field prefixed `ntk_`, so it parses next to TRL's and transformers' argument
    classes without clashes.

    Usage:
    ```python
    from trl import DPOConfig, ModelConfig, TrlParser
    from trl_ntk import DynamicsArguments, LearningDynamicsCallback

    training_args, model_args, ntk_args = TrlParser((DPOConfig, ModelConfig, DynamicsArguments)).parse_args_and_config()
    trainer = DPOTrainer(...)
    trainer.add_callback(LearningDynamicsCallback(trainer, config=ntk_args.to_config()))
    ```
    (`python train.py --ntk_every_n_steps 10 --ntk_attribution tokens`, or `ntk_every_n_steps: 10` in the YAML.)
    """

    ntk_every_n_steps: int = field(default=50, metadata=_help("analyse the optimizer steps that are multiples of this"))
    ntk_attribution: str = field(
        default="sums",
        metadata={**_help("'none' (probe log-probs only), 'sums' or 'tokens'"), "choices": list(ATTRIBUTION_LEVELS)},
    )
    ntk_tokens_every_n_steps: int | None = field(
        default=None, metadata=_help("with ntk_attribution=sums: the 'tokens' level on analysed steps multiple of this")
    )
    ntk_matrix_prompts: int = field(
        default=1, metadata=_help("probe prompts whose full token x token matrix is kept; -1: every prompt")
    )
    ntk_matrix_every_n_steps: int = field(
        default=1000,
        metadata=_help("the token x token matrix at the first tokens-level step and steps multiple of this; -1: all"),
    )
    ntk_num_prompts: int = field(default=4, metadata=_help("prompts drawn from the train dataset for default probes"))
    ntk_generate: bool = field(default=True, metadata=_help("track the model's own greedy response per probe prompt"))
    ntk_num_samples: int = field(default=0, metadata=_help("sampled responses tracked per probe prompt"))
    ntk_sample_temperature: float = field(default=1.0, metadata=_help("temperature of the sampled probe responses"))
    ntk_max_new_tokens: int = field(default=48, metadata=_help("generation length of the greedy / sampled probes"))
    ntk_top_k: int = field(default=5, metadata=_help("training tokens listed per probe response ('tokens' level)"))
    ntk_chunk_size: int | None = field(default=None, metadata=_help("parameter-sized tangents held at once"))
    ntk_score_batch_size: int = field(default=32, metadata=_help("probe responses per scoring forward"))
    ntk_kernel_summaries: bool = field(default=False, metadata=_help("kernel norms at 'tokens' steps"))
    ntk_strict: bool = field(default=False, metadata=_help("raise analysis failures instead of warning and counting"))
    ntk_memory_check: str = field(
        default="downgrade",
        metadata={
            **_help("when the analysis does not fit in memory: downgrade, refuse or off"),
            "choices": list(MEMORY_CHECKS),
        },
    )
    ntk_low_memory: bool = field(
        default=False, metadata=_help("one tangent at a time; finite-difference JVPs (exact ones at the tokens level)")
    )
    ntk_seed: int = field(default=0, metadata=_help("probe selection and sampling seed"))
    ntk_output_dir: str | None = field(
        default=None, metadata=_help("run folder of dynamics.jsonl; default <output_dir>/dynamics")
    )
    ntk_report_to: list[str] | None = field(
        default=None, metadata=_help("trackers besides the JSONL (wandb, tensorboard, trackio); default: report_to")
    )

    def __post_init__(self) -> None:
        self.to_config()  # the same checks, at parse time

    def to_config(self) -> DynamicsConfig:
        """The `DynamicsConfig` these arguments name (`ntk_matrix_prompts=-1` becomes `None`: every prompt;
        `ntk_matrix_every_n_steps=-1`: every tokens-level step)."""
        values = {f.name[len("ntk_") :]: getattr(self, f.name) for f in fields(self)}
        for name in ("matrix_prompts", "matrix_every_n_steps"):
            if values[name] == -1:
                values[name] = None
        return DynamicsConfig(**values)


# ---- NTHRCallback ------------------------------------------------------------------------------------------------


@dataclass
class NTHRConfig:
    """Options of `NTHRCallback`, printable and loggable as run config.

    Args:
        beta (`float`, *optional*, defaults to `1.0`): threshold multiplier, `tau = beta * min s+bar`.
        eta (`float` or `"auto"`, *optional*, defaults to `"auto"`): weight of the selected negative tokens; `"auto"`
            is `2 |0.5 - p|` per group (see `token_weights`).
        vocab (`str`, *optional*, defaults to `"group"`): `"group"` (the paper's restricted `alpha`) or `"full"`.
        every_generation (`bool` or `int`, *optional*, defaults to `True`): `True` reweights every training
            generation batch (as the paper); an integer `n` reweights every n-th one only (the others train on plain
            advantages), trading the fix for less cost.
        hidden_source (`str`, *optional*, defaults to `"auto"`): where the generating policy's final hidden states
            come from: `"old_logps"` (captured during the no-grad forward TRL already runs for the old-policy
            log-probs: `num_iterations > 1`, `steps_per_generation > gradient_accumulation_steps`, or vLLM importance
            sampling), `"generation"` (captured during `generate`, from the decoding forwards; transformers
            generation, single turn, text only), `"forward"` (one extra no-grad forward). `"auto"` takes the first
            available in that order.
        apply (`bool`, *optional*, defaults to `True`): `False` computes and logs everything but leaves the
            advantages unchanged (measure-only).
        chunk_size (`int`, *optional*, defaults to `512`): tokens per chunk in the hidden-reward computation.
    """

    beta: float = 1.0
    eta: float | Literal["auto"] = "auto"
    vocab: Vocab = "group"
    every_generation: bool | int = True
    hidden_source: HiddenSource = "auto"
    apply: bool = True
    chunk_size: int = 512

    def __post_init__(self) -> None:
        check_weight_options(self.beta, self.eta)
        if self.vocab not in ("full", "group"):
            raise ValueError(f"vocab must be 'full' or 'group', got {self.vocab!r}")
        if self.hidden_source not in ("auto", "old_logps", "generation", "forward"):
            raise ValueError(
                f"hidden_source must be 'auto', 'old_logps', 'generation' or 'forward', got {self.hidden_source!r}"
            )
        if self.every_generation is not True and (
            isinstance(self.every_generation, bool)
            or not isinstance(self.every_generation, int)
            or self.every_generation < 1
        ):
            raise ValueError(f"every_generation must be True or a positive integer, got {self.every_generation!r}")
        check_bool("apply", self.apply)
        check_int("chunk_size", self.chunk_size, minimum=1)
