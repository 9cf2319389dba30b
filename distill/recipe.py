"""The recipe schema: the one place where every fewstep option is declared, documented and validated.

A recipe is a YAML file whose sections mirror the pipeline (run, teacher, data, trajectories, targets, student,
distill, train, eval, export, logging). Each field's docstring is its documentation. `load_recipe` applies dotted
command-line overrides (`train.lr=3e-4`, `data.sources.0.train_size=500`, `~eval.max_samples`) to the raw YAML,
then validates the whole tree before any work starts; unknown keys, wrong types and out-of-range values raise
`RecipeError` with the dotted path of the offending field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message is one line naming the dotted path."""


class Section(BaseModel):
    # Unknown keys are errors (a typo must never be silently ignored) and ints are not coerced from strings.
    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True)


def _existing_path(value: Path | None) -> Path | None:
    if value is not None and not Path(value).exists():
        raise ValueError(f"path does not exist: {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control the run as a whole


class RunConfig(Section):
    """Run identity and which pipeline stages to execute.

    - `name`: run name, used for the output directory and the wandb run.
    - `output_dir`: where everything the run writes goes; default `runs/<name>`.
    - `seed`: seeds data generation, initialisation, masking and sampling.
    - `stages`: pipeline stages in order: `teacher` (pretrain or load the teacher), `eval` (decode the eval
      split and score it).
    - `cache_dir`: where pretrained teachers are cached by the hash of their recipe sections so a later run with
      the same teacher + data reuses them; null disables the cache.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")] = "run"
    output_dir: Path | None = None
    seed: NonNegativeInt = 0
    stages: Annotated[list[Literal["teacher", "eval"]], Field(min_length=1)] = ["teacher", "eval"]
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _default_output_dir(self) -> RunConfig:
        if self.output_dir is None:
            self.output_dir = Path("runs") / self.name
        return self


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control optimisation (used by teacher pretraining phases and by distillation)


class TrainConfig(Section):
    """One training phase on the DeepSpeed trainer.

    - `max_steps`: optimizer steps of this phase (0 skips the phase).
    - `micro_batch_size`: sequences per rank per forward.
    - `gradient_accumulation_steps`: micro-batches per optimizer step; global batch = micro x accumulation x ranks.
    - `lr`: peak learning rate; `warmup_steps` linear warm-up; `lr_schedule` after warm-up: `constant`, `cosine`
      or `linear` decay down to `min_lr_ratio` x lr.
    - `weight_decay`, `betas`: AdamW settings. `grad_clip`: max global grad norm, 0 disables clipping.
    - `precision`: `fp32` or `bf16` (DeepSpeed bf16 mode; fp16 is not offered: unsupported on CPU).
    - `zero_stage`: DeepSpeed ZeRO stage 0 (plain DDP), 1, 2 or 3.
    - `deepspeed`: extra DeepSpeed config entries merged over the generated config (e.g. offload settings).
    - `gradient_checkpointing`: recompute activations in backward to save memory.
    - `checkpoint_every`: save a resumable checkpoint every N optimizer steps (0: only at the end).
    - `keep_last`: resumable checkpoints kept on disk.
    - `resume`: `auto` continues from the newest complete checkpoint in the phase directory; `never` starts over.
    - `log_every`: optimizer steps between metric lines.
    """

    max_steps: NonNegativeInt = 100
    micro_batch_size: PositiveInt = 32
    gradient_accumulation_steps: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    warmup_steps: NonNegativeInt = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: Fraction = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 0
    deepspeed: dict[str, Any] = {}
    gradient_checkpointing: bool = False
    checkpoint_every: NonNegativeInt = 0
    keep_last: PositiveInt = 2
    resume: Literal["auto", "never"] = "auto"
    log_every: PositiveInt = 10


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control the teacher


class ModelSizeConfig(Section):
    """Sizes of the embedded Dimple-family model (Qwen2-style blocks)."""

    hidden_size: PositiveInt = 128
    intermediate_size: PositiveInt = 384
    num_hidden_layers: PositiveInt = 4
    num_attention_heads: PositiveInt = 4
    num_key_value_heads: PositiveInt = 2
    max_position_embeddings: PositiveInt = 256

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSizeConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class PretrainConfig(Section):
    """Dimple-style teacher pretraining: an autoregressive phase, then a masked-diffusion phase.

    - `model`: sizes of the model built from scratch.
    - `ar`: the autoregressive phase (causal attention, next-token loss on the response). Its checkpoint is
      kept as `ar-baseline`, the AR model that speed comparisons use.
    - `diffusion`: the diffusion phase (full attention; t ~ U[mask_eps, 1]; each response token masked with
      probability t; CE on masked tokens weighted by 1/t).
    - `mask_eps`: lower bound of t (t near 0 gives a loss weight 1/t that explodes).

    In both phases each answer is followed by a uniformly random number of pad tokens, so its canvas ends
    anywhere between its EOS and `data.max_response_tokens` (Dimple's fix for length bias).
    """

    model: ModelSizeConfig = ModelSizeConfig()
    ar: TrainConfig = TrainConfig(max_steps=200)
    diffusion: TrainConfig = TrainConfig(max_steps=600)
    mask_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-3


class TeacherConfig(Section):
    """Which teacher backbone to use and where its weights come from.

    - `name`: backbone behind the teacher interface: `tiny` (embedded, trained by fewstep), `dimple`, `dream`
      (shifted logits, mask id 151666) or `llada` (unshifted, mask id 126336).
    - `path`: a saved checkpoint directory (local). Null with `name: tiny` means pretrain one (see `pretrain`).
    - `dtype`: weights dtype for inference: `fp32` or `bf16`.
    - `pretrain`: how to pretrain the tiny teacher when `path` is null.
    """

    name: Literal["tiny", "dimple", "dream", "llada"] = "tiny"
    path: Path | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"
    pretrain: PretrainConfig | None = None

    _path_exists = field_validator("path")(_existing_path)

    @model_validator(mode="after")
    def _has_weights(self) -> TeacherConfig:
        if self.path is None and self.pretrain is None:
            raise ValueError("set teacher.path to a checkpoint or give a teacher.pretrain section")
        if self.path is None and self.name != "tiny":
            raise ValueError(f"teacher '{self.name}' cannot be pretrained here; set teacher.path")
        return self


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control the data


class AdditionTask(Section):
    """Multi-digit addition with a scratchpad of carries, e.g. `57+68=` -> `C:110 #### 125`."""

    name: Literal["addition"]
    train_size: NonNegativeInt = 20000
    eval_size: NonNegativeInt = 200
    min_digits: PositiveInt = 1
    max_digits: PositiveInt = 3

    @model_validator(mode="after")
    def _digits_ordered(self) -> AdditionTask:
        if self.min_digits > self.max_digits:
            raise ValueError("min_digits must not exceed max_digits")
        return self


class WordProblemsTask(Section):
    """Templated multi-step arithmetic word problems ending in `#### <answer>` (GSM8K-style).

    The running count stays within 0..max_value and each added or removed amount is at most
    max(1, (max_value - 1) // 2), which keeps default responses within 31 characters.
    """

    name: Literal["word_problems"]
    train_size: NonNegativeInt = 20000
    eval_size: NonNegativeInt = 200
    min_steps: PositiveInt = 2
    max_steps: PositiveInt = 3
    max_value: PositiveInt = 20

    @model_validator(mode="after")
    def _steps_ordered(self) -> WordProblemsTask:
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must not exceed max_steps")
        return self


class SortingTask(Section):
    """Sort a list of small integers ascending."""

    name: Literal["sorting"]
    train_size: NonNegativeInt = 20000
    eval_size: NonNegativeInt = 200
    min_length: PositiveInt = 3
    max_length: PositiveInt = 6
    max_value: PositiveInt = 9

    @model_validator(mode="after")
    def _length_ordered(self) -> SortingTask:
        if self.min_length > self.max_length:
            raise ValueError("min_length must not exceed max_length")
        return self


class FileSource(Section):
    """User data from local JSONL or parquet files.

    - `name`: task name used in reports (any label, e.g. `gsm8k`); scoring is exact match on the `####` answer.
    - `train_path` / `eval_path`: files; either may be null.
    - `format`: `gsm8k` (`question`, `answer` with `#### <final>`), `prompt_response` (`prompt`, `response`), or
      `auto` (detected from the columns).
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")]
    train_path: Path | None = None
    eval_path: Path | None = None
    format: Literal["auto", "gsm8k", "prompt_response"] = "auto"

    _paths_exist = field_validator("train_path", "eval_path")(_existing_path)

    @field_validator("name")
    @classmethod
    def _not_a_builtin(cls, value: str) -> str:
        if value in BUILTIN_TASKS:
            raise ValueError(f"'{value}' is a built-in task name; pick another name for a file source")
        return value


BUILTIN_TASKS = ("addition", "word_problems", "sorting")
TaskSource = Annotated[AdditionTask | WordProblemsTask | SortingTask, Field(discriminator="name")]


class DataConfig(Section):
    """Training and evaluation data.

    - `tasks`: built-in generated tasks (`addition`, `word_problems`, `sorting`), each with its sizes and knobs.
    - `files`: user data sources (JSONL/parquet).
    - `max_response_tokens`: the response canvas: responses are padded to at most this many tokens in training
      and decoders generate this many by default; a longer reference response is an error.
    """

    tasks: list[TaskSource] = []
    files: list[FileSource] = []
    max_response_tokens: PositiveInt = 32

    @model_validator(mode="after")
    def _some_data_and_unique_names(self) -> DataConfig:
        names = [task.name for task in self.tasks] + [source.name for source in self.files]
        if not names:
            raise ValueError("give at least one entry in data.tasks or data.files")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique, repeated: {', '.join(duplicates)}")
        return self

    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks] + [source.name for source in self.files]


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control decoding and evaluation


class DecoderConfig(Section):
    """Decoder settings (the decoding engine in `distill/decoding.py`).

    - `name`: `low_confidence` — fixed-step remasking (LLaDA `generate`): per step commit the k most confident
      masked tokens of the current block.
    - `gen_length`: response canvas in tokens; null uses `data.max_response_tokens`.
    - `steps`: forward passes in total, split evenly over blocks; null means one token per forward
      (steps = gen_length).
    - `block_length`: semi-autoregressive block size; null means one block spanning the canvas.
    - `remasking`: `low_confidence` (top-1 probability) or `random` (uniformly random among masked positions).
    - `temperature`: 0 is greedy; > 0 samples with Gumbel noise.
    """

    name: Literal["low_confidence"] = "low_confidence"
    gen_length: PositiveInt | None = None
    steps: PositiveInt | None = None
    block_length: PositiveInt | None = None
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: Annotated[float, Field(ge=0)] = 0.0


class EvalConfig(Section):
    """Evaluation of teacher / AR baseline / checkpoints on the eval splits.

    - `tasks`: task names to evaluate; null means every task in `data`.
    - `rows`: which models to evaluate: `teacher` and/or `ar-baseline` (the AR-phase checkpoint, decoded
      left to right with causal attention and one token per forward).
    - `decoder`: decoder for diffusion rows.
    - `batch_size`: prompts decoded together.
    - `max_samples`: cap on eval samples per task (null: the whole split).
    """

    tasks: list[str] | None = None
    rows: Annotated[list[Literal["teacher", "ar-baseline"]], Field(min_length=1)] = ["teacher"]
    decoder: DecoderConfig = DecoderConfig()
    batch_size: PositiveInt = 100
    max_samples: PositiveInt | None = None


# ----------------------------------------------------------------------------------------------------------------
# Sections that later stages fill (kept strict so a key meant for them is never silently ignored)


class TrajectoriesConfig(Section):
    """Pseudo-trajectory generation (d3LLM). No options yet."""


class TargetsConfig(Section):
    """Self-distillation-through-time targets (SDTT). No options yet."""


class StudentConfig(Section):
    """How the student is built from the teacher. No options yet."""


class DistillConfig(Section):
    """Distillation losses and curriculum. No options yet."""


class ExportConfig(Section):
    """Export of distilled checkpoints. No options yet."""


class WandbConfig(Section):
    """wandb logging.

    - `mode`: `offline` (default; needs no key, syncs later with `wandb sync`), `online` or `disabled`.
    - `project`: wandb project; the run name is `run.name`.
    """

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "fewstep"


class LoggingConfig(Section):
    """Metrics and progress output.

    - `wandb`: wandb settings; files go to `<output_dir>/wandb`.
    - `progress`: show a progress bar with tokens/s.
    """

    wandb: WandbConfig = WandbConfig()
    progress: bool = True


class Recipe(Section):
    """A whole fewstep recipe. `run`, `teacher` and `data` are required; the rest have defaults."""

    run: RunConfig
    teacher: TeacherConfig
    data: DataConfig
    trajectories: TrajectoriesConfig = TrajectoriesConfig()
    targets: TargetsConfig = TargetsConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _eval_tasks_known(self) -> Recipe:
        known = self.data.task_names()
        for name in self.eval.tasks or []:
            if name not in known:
                raise ValueError(f"eval.tasks names '{name}', which is not in data (have: {', '.join(known)})")
        return self

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named sections (e.g. the teacher + data sections that determine a teacher)."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _dotted(loc: tuple) -> str:
    parts: list[str] = []
    for index, item in enumerate(loc):
        # Drop the discriminator tag pydantic inserts after a list index (data.tasks.0.addition.max_digits).
        if index > 0 and isinstance(loc[index - 1], int) and item in BUILTIN_TASKS:
            continue
        parts.append(str(item))
    return ".".join(parts)


def _format_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    path = _dotted(first["loc"]) or "recipe"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required but missing"
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    got = first.get("input")
    shown = "" if first["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f", got {got!r}"
    return f"{path}: {message}{shown}{extra}"


def parse_override(text: str) -> tuple[list[str], Any, bool]:
    """Parse `a.b=value` (value read as YAML: numbers, bools, lists, null) or `~a.b` (delete)."""
    if text.startswith("~"):
        path = text[1:]
        if not path:
            raise RecipeError(f"override '{text}': empty key")
        return path.split("."), None, True
    if "=" not in text:
        raise RecipeError(f"override '{text}': expected key.path=value or ~key.path")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{text}': malformed key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise RecipeError(f"{key}: value '{raw}' is not valid YAML ({error.problem})") from None
    return key.split("."), value, False


def apply_override(tree: dict, parts: list[str], value: Any, delete: bool) -> None:
    """Set or delete `parts` inside the raw recipe tree; list items are addressed by index."""
    dotted = ".".join(parts)
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: depth + 1]))
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise RecipeError(f"{dotted}: '{'.'.join(parts[:depth])}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        index = int(_list_index(node, last, dotted))
        if delete:
            node.pop(index)
        else:
            node[index] = value
    elif isinstance(node, dict):
        if delete:
            if last not in node:
                raise RecipeError(f"{dotted}: cannot delete, key is not set")
            del node[last]
        else:
            node[last] = value
    else:
        raise RecipeError(f"{dotted}: parent is not a section")


def _list_index(node: list, part: str, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"{dotted}: no list item '{part}' (list has {len(node)} items)")
    return int(part)


def _list_item(node: list, part: str, dotted: str) -> Any:
    return node[_list_index(node, part, dotted)]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply overrides, validate. Raises `RecipeError` with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}:{where} invalid YAML: {problem}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    for text in overrides:
        parts, value, delete = parse_override(text)
        apply_override(tree, parts, value, delete)
    return validate_tree(tree)


def validate_tree(tree: dict) -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        raise RecipeError(_format_validation_error(error)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
