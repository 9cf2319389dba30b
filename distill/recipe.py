"""The recipe schema: the one place where every fewstep option is declared, documented and validated.

A recipe is a YAML file whose sections mirror the pipeline (run, teacher, data, trajectories, targets, student,
distill, train, eval, export, logging). Each field's docstring is its documentation. `load_recipe` applies dotted
command-line overrides (`train.lr=3e-4`, `data.sources.0.train_size=500`, `~eval.max_samples`) to the raw YAML,
then validates the whole tree before any work starts; unknown keys, wrong types, out-of-range values, NaN or
infinity anywhere, a key given twice in one YAML mapping and a recipe file that is not UTF-8 raise `RecipeError`
with the dotted path of the offending field (or the file and line). The module is long on purpose: it is the one place
every option of the toolkit is declared and documented.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def _not_blank(value: Any) -> Any:
    # `run.output_dir=$OUT` with OUT unset gives "", which Path reads as "." (the current directory).
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty path (an unset shell variable?); give a path or null")
    return value


# Every path of the schema: an empty string is refused rather than read as the current directory.
PathField = Annotated[Path, BeforeValidator(_not_blank)]


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message is one line naming the dotted path."""


class Section(BaseModel):
    # Unknown keys are errors (a typo must never be silently ignored), ints are not coerced from strings, and a
    # float must be finite (`lr: .inf` or `"nan"` would train on garbage).
    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True, allow_inf_nan=False)


def _existing_path(value: Path | None) -> Path | None:
    if value is not None and not Path(value).exists():
        raise ValueError(f"path does not exist: {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control the run as a whole


class RunConfig(Section):
    """Run identity and which pipeline stages to execute.

    - `name`: run name, used for the output directory and the wandb run.
    - `output_dir`: where everything the run writes goes; default `runs/<name>`. An empty value (an unset shell
      variable) is an error, never the current directory; one `distill` process uses it at a time (`distill.lock`).
    - `seed`: seeds data generation, initialisation, masking and sampling.
    - `stages`: pipeline stages in order: `teacher` (pretrain or load the teacher), `trajectories` (the teacher
      decodes the training prompts one token per forward and records the order; see `TrajectoriesConfig`),
      `distill` (train the student on the trajectory set, or with an `sdtt` loss on the task training
      sequences; see `StudentConfig`, `DistillConfig`, `TargetsConfig`, `train`),
      `eval` (decode the eval split and score it), `export` (write the distilled student as a Hugging Face folder
      that loads without fewstep, and verify it; see `ExportConfig`).
    - `cache_dir`: where pretrained teachers are cached by the hash of their recipe sections so a later run with
      the same teacher + data reuses them; null disables the cache.
    - `strict_hash`: how the teacher checkpoint is identified for trajectory sets and SDTT resume
      (`teachers.fingerprint.checkpoint_fingerprint`). false (default): config, tokenizer, safetensors headers,
      file sizes and mtimes, without reading the weights; a copy that keeps mtimes (`cp -p`, `rsync -a`) is the
      same teacher, a rewrite of the weights is another. true: the sha256 of every weight byte instead of mtimes
      (minutes on a 7B model, per rank and start), for copies that do not keep mtimes or ranks on several machines
      with their own copies. CLI: `--strict-hash` on `run` and `trajectories`.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")] = "run"
    output_dir: PathField | None = None
    seed: NonNegativeInt = 0
    stages: Annotated[list[Literal["teacher", "trajectories", "distill", "eval", "export"]], Field(min_length=1)] = [
        "teacher",
        "eval",
    ]
    cache_dir: PathField | None = None
    strict_hash: bool = False

    @model_validator(mode="after")
    def _default_output_dir(self) -> RunConfig:
        if self.output_dir is None:
            self.output_dir = Path("runs") / self.name
        return self

    @field_validator("output_dir")
    @classmethod
    def _not_a_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file, not a directory")
        return value


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control optimisation (used by teacher pretraining phases and by distillation)


# DeepSpeed profiles (`train.deepspeed: zero2_offload`) live in the source tree beside the packages, not inside
# one (recipes/ is not a package): <repository>/recipes/deepspeed/<name>.json.
DEEPSPEED_PROFILES_DIR = Path(__file__).resolve().parent.parent / "recipes" / "deepspeed"
AUTO = "auto"
# DeepSpeed fields that fewstep owns -> the TrainConfig field each follows ("auto" is filled from it, a number
# must agree with it); None: left to DeepSpeed, which derives it.
DEEPSPEED_AUTO_FIELDS: dict[str, str | None] = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "train_batch_size": None,
    "gradient_clipping": "grad_clip",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "zero_optimization.stage": "zero_stage",
}
_DEEPSPEED_OWNER_FIELDS = {field for field in DEEPSPEED_AUTO_FIELDS.values() if field is not None}
_MISSING = object()


def deepspeed_profiles() -> list[str]:
    """Names of the DeepSpeed profiles shipped in `recipes/deepspeed/`."""
    return sorted(path.stem for path in DEEPSPEED_PROFILES_DIR.glob("*.json"))


def _is_profile_name(value: str) -> bool:
    return not value.endswith(".json") and "/" not in value


def load_deepspeed_file(value: str) -> dict[str, Any]:
    """The DeepSpeed config a `train.deepspeed` string names: a profile name or a JSON file (one-line ValueError)."""
    path = DEEPSPEED_PROFILES_DIR / f"{value}.json" if _is_profile_name(value) else Path(value)
    if not path.is_file():
        if _is_profile_name(value):
            raise ValueError(
                f"unknown DeepSpeed profile '{value}' (profiles: {', '.join(deepspeed_profiles())}; "
                "or give the path of a .json file)"
            )
        raise ValueError(f"DeepSpeed config file not found: {path}")
    try:
        tree = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except _NonFinite as error:
        raise ValueError(f"{path}: {error} is not a finite number") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object, got {type(tree).__name__}")
    return tree


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> None:
    # Python's json reads NaN, Infinity and -Infinity, which JSON itself does not have.
    raise _NonFinite(name)


@functools.cache
def deepspeed_schema() -> tuple[str, frozenset[str], dict[str, type[BaseModel]]]:
    """What the installed DeepSpeed reads from a config: its version, the top-level keys and the pydantic model of
    each section that has one (`zero_optimization`, `bf16`, `fp16`, the monitors).

    The top-level keys are recorded by running DeepSpeed's own config parser on a config that records every key it
    looks up (DeepSpeed has no list of them: each key is read by its own getter), less those it refuses as removed.
    """
    import deepspeed
    from deepspeed.monitor.config import DeepSpeedMonitorConfig
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    class Recording(dict):
        read: set[str] = set()

        def get(self, key: Any, *default: Any) -> Any:
            Recording.read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key: Any) -> Any:
            Recording.read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: Any) -> bool:
            Recording.read.add(key)
            return super().__contains__(key)

        def keys(self) -> Any:  # `KEY in config.keys()`, DeepSpeed's other way of asking
            return RecordingKeys(super().keys())

    class RecordingKeys(set):
        def __contains__(self, key: Any) -> bool:
            Recording.read.add(key)
            return super().__contains__(key)

    ds_config.DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1))
    removed = set(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    sections: dict[str, type[BaseModel]] = {
        "zero_optimization": DeepSpeedZeroConfig,
        "bf16": DeepSpeedBF16Config,
        "bfloat16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config,
    }
    for name, field in DeepSpeedMonitorConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            sections[name] = field.annotation
    return deepspeed.__version__, frozenset(key for key in Recording.read if isinstance(key, str)) - removed, sections


def _model_keys(model: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """Each key a DeepSpeed config model accepts (field names and aliases) -> the model of its subsection."""
    keys: dict[str, type[BaseModel] | None] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", None) or (annotation,)  # Optional[Model] -> Model
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        for key in (name, field.alias, field.validation_alias if isinstance(field.validation_alias, str) else None):
            if key:
                keys[key] = sub
    return keys


def _check_deepspeed_keys(tree: dict[str, Any]) -> None:
    """Refuse a key the installed DeepSpeed does not read (`zero_optimizaton` would silently train at ZeRO-0)."""
    version, top_level, sections = deepspeed_schema()

    def unknown(key: str, known: set[str] | frozenset[str], where: str) -> ValueError:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ValueError(f"'{where}{key}' is not a DeepSpeed {version} config key{hint}")

    def walk(node: dict[str, Any], model: type[BaseModel], where: str) -> None:
        keys = _model_keys(model)
        for key, value in node.items():
            if key not in keys:
                raise unknown(key, set(keys), where)
            if isinstance(value, dict) and keys[key] is not None:
                walk(value, keys[key], f"{where}{key}.")

    for key, value in tree.items():
        if key not in top_level:
            raise unknown(key, top_level, "")
        if isinstance(value, dict) and key in sections:
            walk(value, sections[key], f"{key}.")


def _dotted_get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _dotted_leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves += _dotted_leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def _deepspeed_owned_values(fields: dict[str, Any]) -> dict[str, Any]:
    """The value of every owned DeepSpeed field given TrainConfig `fields` (None: DeepSpeed derives it)."""
    return {
        "train_micro_batch_size_per_gpu": fields["micro_batch_size"],
        "gradient_accumulation_steps": fields["gradient_accumulation_steps"],
        "train_batch_size": None,
        "gradient_clipping": fields["grad_clip"],
        "bf16.enabled": fields["precision"] == "bf16",
        "fp16.enabled": False,
        "zero_optimization.stage": fields["zero_stage"],
    }


def fill_deepspeed_auto(tree: dict[str, Any], values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of `tree` with every `"auto"` replaced by `values[dotted key]` (`TrainConfig.deepspeed_auto_values`);
    a None value drops the key."""
    filled: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            filled[key] = fill_deepspeed_auto(value, values, f"{dotted}.")
        elif value == AUTO:
            if values[dotted] is not None:
                filled[key] = values[dotted]
        else:
            filled[key] = value
    return filled


def check_deepspeed_config(tree: dict[str, Any], fields: dict[str, Any] | None) -> None:
    """Reject what fewstep cannot run from a `train.deepspeed` config (one-line ValueError):
    `optimizer` / `scheduler` sections, `"auto"` outside `DEEPSPEED_AUTO_FIELDS`, owned fields that disagree with
    the TrainConfig `fields` (skipped when None), parameter offload below ZeRO stage 3 and keys the installed
    DeepSpeed does not read (`deepspeed_schema`)."""
    if tree:
        _check_deepspeed_keys(tree)
    for section in ("optimizer", "scheduler"):
        if section in tree:
            raise ValueError(
                f"remove '{section}': fewstep builds AdamW and its schedule from lr, betas, weight_decay, "
                "warmup_steps and lr_schedule"
            )
    for dotted, value in _dotted_leaves(tree):
        if value == AUTO and dotted not in DEEPSPEED_AUTO_FIELDS:
            raise ValueError(
                f"'{dotted}' is \"auto\", which fewstep does not fill (it fills {', '.join(DEEPSPEED_AUTO_FIELDS)})"
            )
    if fields is None:
        return
    owned = _deepspeed_owned_values(fields)
    stage = _dotted_get(tree, "zero_optimization.stage")
    if stage not in (_MISSING, AUTO) and stage != fields["zero_stage"]:
        raise ValueError(
            f"zero_optimization.stage is {stage!r} but zero_stage is {fields['zero_stage']}; the DeepSpeed "
            f"config decides the stage: set zero_stage to {stage!r} or leave it out"
        )
    for dotted, wanted in owned.items():
        have = _dotted_get(tree, dotted)
        if wanted is None or have in (_MISSING, AUTO) or dotted == "zero_optimization.stage" or have == wanted:
            continue
        field = DEEPSPEED_AUTO_FIELDS[dotted]
        raise ValueError(
            f'{dotted} is {have!r} but {field} is {fields[field]!r}; set {field} instead (or write "auto")'
        )
    offload_param = _dotted_get(tree, "zero_optimization.offload_param")
    if offload_param is not _MISSING and fields["zero_stage"] != 3:
        raise ValueError(f"zero_optimization.offload_param needs ZeRO stage 3, zero_stage is {fields['zero_stage']}")


class TrainConfig(Section):
    """One training phase on the DeepSpeed trainer.

    - `max_steps`: optimizer steps of this phase (0 skips the phase).
    - `micro_batch_size`: sequences per rank per forward.
    - `gradient_accumulation_steps`: micro-batches per optimizer step; global batch = micro x accumulation x ranks.
    - `lr`: peak learning rate; `warmup_steps` linear warm-up; `lr_schedule` after warm-up: `constant`, `cosine`
      or `linear` decay down to `min_lr_ratio` x lr.
    - `weight_decay`, `betas`: AdamW settings. `grad_clip`: max global grad norm, 0 disables clipping.
    - `precision`: `fp32` or `bf16` (DeepSpeed bf16 mode; fp16 is not offered: unsupported on CPU).
    - `zero_stage`: DeepSpeed ZeRO stage 0 (plain DDP), 1, 2 or 3. When `deepspeed` names a stage, that stage
      rules: `zero_stage` must equal it, and a recipe that leaves `zero_stage` out takes it from there.
    - `deepspeed`: DeepSpeed config entries deep-merged over the config generated from this section. Either a
      mapping, or a string read when the recipe loads (its JSON then replaces the string, so the resolved recipe
      holds the exact config): a profile name (`zero1`, `zero2`, `zero2_offload` (d3LLM's: ZeRO-2 with the
      optimizer offloaded to CPU), `zero3`, `zero3_offload` (parameters offloaded too); the files
      `recipes/deepspeed/<name>.json` of the fewstep source tree, found beside the `distill` package, so they
      need a source or editable install) or a path to a JSON file (any string ending in `.json` or holding a
      `/`; relative to the working directory). The value `"auto"` is filled from this section:
      `train_micro_batch_size_per_gpu` (micro_batch_size), `gradient_accumulation_steps`, `gradient_clipping`
      (grad_clip), `bf16.enabled` (precision), `fp16.enabled` (false), `zero_optimization.stage` (zero_stage),
      `train_batch_size` (left to DeepSpeed: micro x accumulation x ranks); `"auto"` anywhere else is an error.
      A number given to one of those fields must agree with this section, and `optimizer` / `scheduler` entries
      are refused: fewstep's AdamW and schedule come from `lr`, `betas`, `weight_decay` and the schedule fields.
      `zero_optimization.offload_param` needs ZeRO stage 3. Every key must be one the installed DeepSpeed reads
      (top level, and inside `zero_optimization`, `bf16`, `fp16` and the monitors): a misspelt key is an error
      naming the closest known one, where DeepSpeed would silently ignore it. NaN and infinity are refused.
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
    deepspeed: dict[str, Any] | str = {}
    gradient_checkpointing: bool = False
    checkpoint_every: NonNegativeInt = 0
    keep_last: PositiveInt = 2
    resume: Literal["auto", "never"] = "auto"
    log_every: PositiveInt = 10

    @model_validator(mode="before")
    @classmethod
    def _zero_stage_from_deepspeed(cls, data: Any) -> Any:
        # The DeepSpeed config decides the ZeRO stage: a recipe that leaves zero_stage out takes it from there.
        if not isinstance(data, dict) or "zero_stage" in data or not data.get("deepspeed"):
            return data
        try:
            tree = load_deepspeed_file(data["deepspeed"]) if isinstance(data["deepspeed"], str) else data["deepspeed"]
        except ValueError:
            return data  # the `deepspeed` field reports it
        section = tree.get("zero_optimization") if isinstance(tree, dict) else None
        stage = section.get("stage") if isinstance(section, dict) else None
        return {**data, "zero_stage": stage} if type(stage) is int else data

    @field_validator("deepspeed")
    @classmethod
    def _resolve_deepspeed(cls, value: dict[str, Any] | str, info: ValidationInfo) -> dict[str, Any]:
        tree = load_deepspeed_file(value) if isinstance(value, str) else value
        # Fields that failed their own validation are missing here; their own error is the one reported.
        check_deepspeed_config(tree, info.data if all(name in info.data for name in _DEEPSPEED_OWNER_FIELDS) else None)
        return tree

    def deepspeed_auto_values(self) -> dict[str, Any]:
        """What each `"auto"` DeepSpeed field becomes (dotted keys); None leaves the field to DeepSpeed."""
        return _deepspeed_owned_values(self.model_dump())


# ----------------------------------------------------------------------------------------------------------------
# Parameters that control the teacher


class ModelSizeConfig(Section):
    """Sizes of a pretrained tiny teacher (in Qwen2 terms; mapped onto each backbone's config)."""

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


DEFAULT_PREFIX_BLOCK = 8


def unused_prefix_block(prefix_fraction: float, prefix_block: int) -> bool:
    """True when a block size other than the default is set but no row is noised in blocks (`prefix_fraction` 0):
    it would be silently ignored. The default itself passes, so a resolved recipe (which writes every field) reloads.
    """
    return not prefix_fraction and prefix_block != DEFAULT_PREFIX_BLOCK


class PretrainConfig(Section):
    """Dimple-style teacher pretraining: an autoregressive phase, then a masked-diffusion phase.

    - `model`: sizes of the model built from scratch.
    - `ar`: the autoregressive phase (causal attention, next-token loss on the response). Its checkpoint is
      kept as `ar-baseline`, the AR model that speed comparisons use.
    - `diffusion`: the diffusion phase (full attention; t ~ U[mask_eps, 1]; each response token masked with
      probability t; CE on masked tokens, weighted as `loss_weighting` says).
    - `mask_eps`: lower bound of t (t near 0 gives a loss weight 1/t that explodes).
    - `loss_weighting`: `uniform` (mean CE over masked tokens) or `inverse_t` (LLaDA's ELBO weighting 1/t);
      see `distill.losses.masked_diffusion_loss`.
    - `ar_anchor_weight`: the diffusion phase also takes the AR phase's next-token loss (causal attention, same
      weights) at this weight; 0 is pure masked diffusion. It keeps what the AR phase learned while the model
      adapts to full attention over masks (`distill/pretrain.py`; measured in `docs/benchmark.md`).
    - `prefix_fraction`: the share of each diffusion batch noised as a block decoder sees its canvas mid-answer
      (clean prefix, a block of `prefix_block` tokens masked at rate t, the rest masked) and scored on that block
      only (`distill.losses.mask_block_after_prefix`); 0 noises every row uniformly. Needs `uniform` weighting.
    - `prefix_block`: the block length of those rows (the decoders' `block_length`).
    - `train_vision`: Dimple only: which of its vision parts train in both phases: `projector` (default: the
      vision tower stays at its random initialisation, a fixed feature extractor whose features already separate
      small drawn images, and the image projector learns to map them into the LM), `all` (tower too), `none`.
      Measured on `colour_digits`: with the tower training, the tiny model never learned to read its images in 400
      steps (a reading probe stayed at the image-blind loss); with `projector` it did.

    In both phases each answer is followed by a uniformly random number of pad tokens, so its canvas ends
    anywhere between its EOS and `data.max_response_tokens` (Dimple's fix for length bias).
    """

    model: ModelSizeConfig = ModelSizeConfig()
    ar: TrainConfig = TrainConfig(max_steps=200)
    diffusion: TrainConfig = TrainConfig(max_steps=600)
    mask_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    loss_weighting: Literal["uniform", "inverse_t"] = "uniform"
    ar_anchor_weight: Annotated[float, Field(ge=0)] = 0.0
    prefix_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    prefix_block: Annotated[int, Field(ge=1)] = DEFAULT_PREFIX_BLOCK
    train_vision: Literal["all", "projector", "none"] = "projector"

    @field_validator("ar", "diffusion")
    @classmethod
    def _no_zero3(cls, phase: TrainConfig) -> TrainConfig:
        # The AR phase hands its full weights to the diffusion phase and to the saved checkpoints in place; a
        # ZeRO-3 engine leaves that module partitioned. A model this size never needs ZeRO-3 anyway.
        if phase.zero_stage == 3:
            raise ValueError("zero_stage 3 (ZeRO-3) is not supported for teacher pretraining; use 0, 1 or 2")
        return phase

    @model_validator(mode="after")
    def _prefix_rows_are_a_mean(self) -> PretrainConfig:
        # A block row scores a handful of tokens chosen by its cut, not |response| * t of them: 1/t has no meaning.
        if self.prefix_fraction and self.loss_weighting != "uniform":
            raise ValueError("prefix_fraction needs loss_weighting 'uniform' (a block row's loss is its block's mean)")
        if unused_prefix_block(self.prefix_fraction, self.prefix_block):
            raise ValueError("prefix_block sizes the block rows of prefix_fraction; set prefix_fraction > 0 or drop it")
        return self


class TeacherConfig(Section):
    """Which teacher backbone to use and where its weights come from.

    - `name`: the backbone: `llada` (LLaDA-8B-Instruct), `dream` (Dream-v0-Instruct-7B) or `dimple` (Dimple-7B);
      each loads with fewstep's native class (`teachers/backbones/`), its own config.json and safetensors
      unchanged. Null reads it from `path`'s config.json (`model_type`); with `pretrain` and no `path`, null means
      `dream`, the embedded default (a tiny model of the Dimple family's language model).
    - `path`: a checkpoint folder (local): a downloaded published checkpoint or one fewstep wrote. Null means
      pretrain one (see `pretrain`).
    - `dtype`: weights dtype for inference: `fp32` or `bf16`.
    - `pretrain`: how to pretrain a tiny teacher when `path` is null. When both are set, `path` wins and
      `pretrain` is ignored, so a pretraining recipe is pointed at an existing checkpoint with one override
      (`teacher.path=runs/teacher-tiny/teacher`).
    """

    name: Literal["llada", "dream", "dimple"] | None = None
    path: PathField | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"
    pretrain: PretrainConfig | None = None

    _path_exists = field_validator("path")(_existing_path)

    @model_validator(mode="after")
    def _has_weights(self) -> TeacherConfig:
        if self.path is None and self.pretrain is None:
            raise ValueError("set teacher.path to a checkpoint or give a teacher.pretrain section")
        if self.path is None:
            self.name = self.name or "dream"
            return self
        from teachers.interface import backbone_of  # the models' floor; imported here to keep validation light

        if not Path(self.path).is_dir():
            raise ValueError(f"path: {self.path} is a file, not a checkpoint folder")
        if not any(Path(self.path).glob("*.safetensors")):
            raise ValueError(f"path: {self.path} holds no *.safetensors weights")
        try:
            found = backbone_of(self.path).name
        except OSError as error:
            raise ValueError(str(error)) from None
        if self.name is not None and self.name != found:
            raise ValueError(f"name: '{self.name}', but {Path(self.path) / 'config.json'} holds a {found} checkpoint")
        self.name = found
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


class AddendsTask(Section):
    """Write a number as the sum of two addends, any pair counts: `0632=?+?` -> `#### 0421+0211`.

    A verifiable task with many right answers: reference splits are drawn digit by digit without carries, so a
    model trained on them is unsure of each column's digits until one of the two is chosen, and committing both
    in one forward can mix different splits. That is the case parallel decoding is hard for (the multimodality of
    real text, in miniature) and distillation onto the teacher's own answers fixes. The number has
    min_digits..max_digits digits; numbers and addends are written with max_digits digits.

    - `even_split`: probability that a column takes the even split (half the digit, rounded down) rather than a
      uniformly drawn one. Above 0 the even split is every column's most likely answer, so greedy choices agree
      across columns and a student can learn them; at 0 no split is preferred, and a model that commits two
      uncertain digits of a column in one forward mostly gets the column wrong.
    """

    name: Literal["addends"]
    train_size: NonNegativeInt = 20000
    eval_size: NonNegativeInt = 200
    min_digits: PositiveInt = 1
    max_digits: PositiveInt = 5
    even_split: Annotated[float, Field(ge=0, le=1)] = 0.25

    @model_validator(mode="after")
    def _digits_ordered(self) -> AddendsTask:
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


class ChainArithmeticTask(Section):
    """Chain-of-thought word problems (GSM8K format) whose responses are long chains of dependent steps.

    Prompt `Ann has 23 apples. She buys 4 bags of 12 apples. She gives away 31. She finds 18 more. How many apples
    does she have?`, response `4 * 12 = 48, 23 + 48 = 71, 71 - 31 = 40, 40 + 18 = 58 #### 58`: one `a op b = c`
    equation per operation, in the question's order, every operand copied from the question or an earlier result
    (the running count or a bag product). Each result feeds a later equation, so a decoder that commits a result
    before its operands (many tokens per forward) guesses it: the task on which parallel decoding costs accuracy.

    - `min_steps` / `max_steps`: operations (equations) per problem, drawn uniformly in between. A "buys K bags of
      M" sentence is two operations (`K * M = P`, then adding P); the others (buys/finds/gets N more, gives
      away/loses/sells N) are one.
    - `min_value` / `max_value`: the start count, every added or removed amount, every bag size M, every product
      and every running count lie in min_value..max_value; bag counts K are 2..9. max_value must be at least
      3 * min_value, so that from any count an addition or a subtraction of at least min_value stays in range.
    - `step_order`: `question` writes the equations in the question's order. `shuffled` writes the question's
      operations in an order drawn per problem among those that keep every running count in range (a bag
      purchase stays its two equations): the answer is the same, the written solution is one of several right
      ones, as worked solutions are (GSM8K's are). A model trained on them is unsure which operation comes next,
      so a decoder that commits several tokens of a step in one forward can mix two solutions.

    At the defaults (4 operations, 10..99) every number but K has two digits, so every step is 11 or 12
    characters and a response is 60 to 62 characters, 52 to 54 of them before `####` (response + EOS fits a
    64-token canvas under the character tokenizer).
    """

    name: Literal["chain_arithmetic"]
    train_size: NonNegativeInt = 20000
    eval_size: NonNegativeInt = 200
    min_steps: PositiveInt = 4
    max_steps: PositiveInt = 4
    min_value: PositiveInt = 10
    max_value: PositiveInt = 99
    step_order: Literal["question", "shuffled"] = "question"

    @model_validator(mode="after")
    def _ranges_ordered(self) -> ChainArithmeticTask:
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must not exceed max_steps")
        if self.max_value < 3 * self.min_value:
            raise ValueError(f"max_value must be at least 3 * min_value ({3 * self.min_value})")
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


# The colours `colour_digits` draws in (their RGB values are `eval.images.PALETTE`): saturated and far apart, so a
# vision tower tells them apart at one 28-px cell per digit.
Colour = Literal["red", "green", "blue", "orange", "purple", "black"]


class ColourDigitsTask(Section):
    """A visual task (Dimple): add the digits of one colour in a drawn grid, e.g. `Add the red digits.` -> the
    four lines `red: 3 5 7`, `3+5=8`, `8+7=15`, `#### 15`.

    Each record has one RGB image of rows x cols cells, each exactly 28x28 pixels (one merged 2x2 patch token of
    Qwen2-VL's 14-px patches, so the image is one token per cell and the resize keeps it as is), holding one digit
    0-9 drawn in a 5x7 dot font in one of `colours` on white. The prompt names one colour; 1..max_asked of the
    cells carry it, the others another colour of the list. The response lists that colour's digits in reading
    order (left to right, top to bottom), adds them one step per line and ends in `#### <sum>`.

    - `rows` / `cols`: the grid; rows * cols must be at least 4 (Qwen2-VL's minimum of 3136 pixels, 56x56).
    - `colours`: at least 2 distinct names of the palette: red, green, blue, orange, purple, black.
    - `min_asked` / `max_asked`: how many digits have the asked colour (uniform in min_asked..max_asked, at most
      rows * cols). A response is at most 34 characters at the defaults (`blue: 9 9 9`, `9+9=18`, `18+9=27`,
      `#### 27` and three newlines; 36 with a six-letter colour): response + EOS fits a 40-token canvas under the
      character tokenizer.
    - `fixed_width`: write every sum with the digits of the largest possible one (`3+5=08`, `08+7=15`, `#### 15`),
      as `addition` does: with a fixed count and colour names of one length, every character sits at a fixed
      offset, which a tiny diffusion model learns much faster than layouts that shift with the sums.
    """

    name: Literal["colour_digits"]
    train_size: NonNegativeInt = 20000
    eval_size: NonNegativeInt = 200
    rows: PositiveInt = 2
    cols: PositiveInt = 3
    colours: list[Colour] = ["red", "blue"]
    min_asked: PositiveInt = 1
    max_asked: PositiveInt = 3
    fixed_width: bool = False

    @model_validator(mode="after")
    def _grid_and_colours(self) -> ColourDigitsTask:
        if self.rows * self.cols < 4:
            cells = self.rows * self.cols
            raise ValueError(f"rows * cols must be at least 4 (Qwen2-VL's minimum image size), got {cells}")
        if len(set(self.colours)) < 2 or len(set(self.colours)) != len(self.colours):
            raise ValueError(f"colours must be at least 2 distinct palette colours, got {self.colours}")
        if self.max_asked > self.rows * self.cols:
            raise ValueError(f"max_asked must not exceed rows * cols ({self.rows * self.cols})")
        if self.min_asked > self.max_asked:
            raise ValueError("min_asked must not exceed max_asked")
        return self


class FileSource(Section):
    """User data from local JSONL or parquet files.

    - `name`: task name used in reports (any label, e.g. `gsm8k`); scoring is exact match on the `####` answer.
    - `train_path` / `eval_path`: files; either may be null. A file that is empty or blank is an error.
    - `format`: `gsm8k` (`question`, `answer` with `#### <final>`), `prompt_response` (`prompt`, `response`), or
      `auto` (detected from the columns). Either format's rows may carry images (Dimple): `image` (one) or
      `images` (a list), paths relative to the data file, or image bytes in parquet (`eval/userdata.py`).
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")]
    train_path: PathField | None = None
    eval_path: PathField | None = None
    format: Literal["auto", "gsm8k", "prompt_response"] = "auto"

    _paths_exist = field_validator("train_path", "eval_path")(_existing_path)

    @field_validator("name")
    @classmethod
    def _not_a_builtin(cls, value: str) -> str:
        if value in BUILTIN_TASKS:
            raise ValueError(f"'{value}' is a built-in task name; pick another name for a file source")
        return value


BUILTIN_TASKS = ("addition", "addends", "word_problems", "chain_arithmetic", "sorting", "colour_digits")
TaskSource = Annotated[
    AdditionTask | AddendsTask | WordProblemsTask | ChainArithmeticTask | SortingTask | ColourDigitsTask,
    Field(discriminator="name"),
]


class DataConfig(Section):
    """Training and evaluation data.

    - `tasks`: built-in generated tasks (`addition`, `addends`, `word_problems`, `chain_arithmetic`, `sorting`,
      and the visual `colour_digits`), each with its sizes and knobs.
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

DECODER_NAMES = ("low_confidence", "confident", "threshold", "multi_block")
# The setting an evaluation sweep varies for each decoder (its speed/accuracy knob).
DECODER_KNOBS = {
    "low_confidence": "steps",
    "confident": "threshold",
    "threshold": "threshold",
    "multi_block": "threshold",
}
# What each decoder does when a setting is left null: the values its paper uses.
_DECODER_DEFAULTS = {
    "low_confidence": {"cache": "none", "eos_fill": False},
    "confident": {"threshold": 0.9, "cache": "prompt", "eos_fill": False},
    "threshold": {"threshold": 0.9, "cache": "blocks", "eos_fill": False},
    "multi_block": {"threshold": 0.5, "cache": "blocks", "eos_fill": True},
}


class DecoderConfig(Section):
    """Decoder settings (the decoding engine in `distill/decoding.py`).

    Parameters that choose the decoder and its canvas:
    - `name`: `low_confidence` — fixed-step remasking (LLaDA `generate`): per step commit the k most confident
      masked tokens of the current block, k from an even split of the block's masks over its steps.
      `confident` — Dimple's confident decoding: commit every masked token of the current block whose confidence
      exceeds `threshold`; when none does, fall back to the `low_confidence` schedule (so at least one token is
      committed, and never more than `steps` forwards in all). `threshold` — Fast-dLLM's threshold parallel
      decoding: commit every masked token of the current block above `threshold`, and always the most confident
      one. `multi_block` — d3LLM's entropy multi-block decoding (see the multi-block parameters below).
    - `gen_length`: response canvas in tokens; null uses `data.max_response_tokens`.
    - `steps`: forward passes of the fixed schedule, split evenly over blocks; used by `low_confidence` and as
      `confident`'s fallback schedule; null means one token per forward (steps = gen_length).
    - `block_length`: semi-autoregressive block size; null means one block spanning the canvas. Positions past the
      current block (past the last active block for `multi_block`) are never committed.

    Parameters that control which token and which positions are chosen:
    - `remasking`: for `low_confidence`: `low_confidence` (rank by top-1 probability) or `random` (uniformly
      random among masked positions).
    - `temperature`: 0 is greedy; > 0 samples with Gumbel noise at this temperature.
    - `top_k`: keep only the k most likely tokens before sampling; null keeps all.
    - `top_p`: keep the smallest set of tokens whose probability reaches p (nucleus); 1.0 keeps all.
      Confidences are read from the (top-k/top-p filtered) distribution at temperature 1, so a threshold means
      the same thing at every temperature.
    - `confidence`: what `confident` and `threshold` compare with `threshold`: `probability` (top-1 probability,
      Dream's `maskgit_plus`), `margin` (top-1 minus top-2 probability) or `neg_entropy` (sum p log p, <= 0).
    - `threshold`: `confident`/`threshold`: commit a token whose confidence is strictly above this (in [0, 1] for
      `probability`/`margin`; <= 0 for `neg_entropy`, which has no default); 1.0 with `probability` commits
      nothing by threshold, so `confident` reduces to its schedule. `multi_block`: accept a token whose entropy
      (nats) is at most this (>= 0). Null: the decoder's default (0.9 for `confident`/`threshold`, 0.5 for
      `multi_block`, d3LLM's LLaDA value); unused by `low_confidence`.

    Parameters of `multi_block` (d3LLM):
    - `activate_fraction`: a block becomes active (may commit tokens under the entropy threshold) once the
      previous block is at least this fraction decoded (and active itself); default 0.1.
    - `full_activate_fraction`: a block becomes fully active once the previous block is at least this fraction
      decoded; each forward always commits the single lowest-entropy masked token of the fully active blocks
      (the first unfinished block is always fully active). Default 0.95; must be >= `activate_fraction`.
    - `eos_fill`: as soon as an EOS is committed, fill every masked position after it with EOS (they can no
      longer change the answer); null: true for `multi_block`, false otherwise.

    Parameters of the KV cache (Dimple prefilling, Fast-dLLM block cache, d3LLM delayed cache):
    - `cache`: `none` (every forward encodes prompt + response), `prompt` (the prompt's keys/values are computed
      once and only the response is re-encoded) or `blocks` (the prompt and every finished leading block are
      cached; the cache is rebuilt when another block finishes). The step that builds or rebuilds the cache
      decodes from a full forward, as Dimple's first step and Fast-dLLM's first step of a block do. Exact for a
      causal model; with bidirectional attention the cached prefix does not see the tokens after it (the
      approximation these papers accept for speed; `distill bench decode` measures what it changes). Null: the
      decoder's default (`none` for `low_confidence`, `prompt` for `confident`, `blocks` for `threshold` and
      `multi_block`).
    - `cache_delay`: forwards a finished block is still re-encoded before it enters the `blocks` cache (its
      representation settles first, as in d3LLM); 0 caches it at the next forward (Fast-dLLM).
    - `refresh_every`: every N-th forward of a batch is a full forward without the cache, so that step sees exact
      logits (d3LLM's periodic refresh); 0 never refreshes.

    Parameters of the static path (GPU speed; the same tokens as without them):
    - `static`: the model always runs on the whole batch (finished samples stay in it) and the prefix cache lives
      in buffers allocated once per decode, so every forward of a block has fixed shapes and buffer addresses.
      Decodes token for token as the default (eager) path does; costs compute on finished samples.
    - `compile`: run the model's forwards through `torch.compile` (mode `reduce-overhead`, i.e. CUDA graphs, on a
      GPU; the default mode on CPU), on the static path (implied). The first decode of each shape compiles (one
      shape per block for `blocks`); `distill bench decode` measures the gain.

    Parameters of structure priors (Dimple):
    - `pins`: `{position: text}`; the text's tokens are committed at that response position before decoding
      (e.g. `{-8: "#### "}` or a JSON skeleton). A negative position counts from the end of the response
      (`fixed_length`, else `gen_length`). Pinned tokens are not counted as generated tokens.
    - `fixed_length`: fix the response length: positions from here on are pinned to EOS before decoding; null
      leaves the length to the model.
    """

    name: Literal["low_confidence", "confident", "threshold", "multi_block"] = "low_confidence"
    gen_length: PositiveInt | None = None
    steps: PositiveInt | None = None
    block_length: PositiveInt | None = None
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: Annotated[float, Field(ge=0)] = 0.0
    top_k: PositiveInt | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    confidence: Literal["probability", "margin", "neg_entropy"] = "probability"
    threshold: float | None = None
    activate_fraction: Fraction = 0.1
    full_activate_fraction: Fraction = 0.95
    eos_fill: bool | None = None
    cache: Literal["none", "prompt", "blocks"] | None = None
    cache_delay: NonNegativeInt = 1
    refresh_every: NonNegativeInt = 0
    static: bool = False
    compile: bool = False
    pins: dict[int, Annotated[str, Field(min_length=1)]] = {}
    fixed_length: PositiveInt | None = None

    @model_validator(mode="after")
    def _resolve_defaults(self) -> DecoderConfig:
        defaults = _DECODER_DEFAULTS[self.name]
        if self.cache is None:
            self.cache = defaults["cache"]
        if self.eos_fill is None:
            self.eos_fill = defaults["eos_fill"]
        if self.threshold is None and "threshold" in defaults:
            if self.name != "multi_block" and self.confidence == "neg_entropy":
                raise ValueError("threshold: set it explicitly (a value <= 0) for confidence neg_entropy")
            self.threshold = defaults["threshold"]
        if self.threshold is not None and self.name != "low_confidence":
            if self.name == "multi_block" and self.threshold < 0:
                raise ValueError(f"threshold: an entropy bound must be >= 0, got {self.threshold}")
            if self.name != "multi_block" and self.confidence == "neg_entropy" and self.threshold > 0:
                raise ValueError(f"threshold: a neg_entropy bound must be <= 0, got {self.threshold}")
            if self.name != "multi_block" and self.confidence != "neg_entropy" and not 0 <= self.threshold <= 1:
                raise ValueError(f"threshold: a {self.confidence} bound must lie in [0, 1], got {self.threshold}")
        if self.full_activate_fraction < self.activate_fraction:
            raise ValueError("full_activate_fraction must be >= activate_fraction")
        return self

    def check_lengths(self, gen_length: int) -> None:
        """Reject settings whose block/step split or structure prior does not fit `gen_length` (ValueError)."""
        block_length = self.block_length or gen_length
        steps = self.steps or gen_length
        if gen_length % block_length:
            raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
        blocks = gen_length // block_length
        if steps % blocks:
            raise ValueError(f"steps {steps} is not a multiple of the number of blocks {blocks}")
        if steps > gen_length:
            raise ValueError(f"steps {steps} exceeds gen_length {gen_length}")
        if self.fixed_length is not None and self.fixed_length > gen_length:
            raise ValueError(f"fixed_length {self.fixed_length} exceeds gen_length {gen_length}")
        length = self.fixed_length or gen_length
        for position in self.pins:
            if not -length <= position < length:
                raise ValueError(f"pins: position {position} is outside a response of {length} tokens")


# The adaptive sweep (`sweep: auto`) walks each decoder's knob along one of these ladders, from one token per
# forward towards the fastest setting, and stops after the first value whose accuracy fell past AUP's cut-off.
# `steps`: the tokens per step tried within a block; steps per block = ceil(block_length / k), ending at 1.
STEPS_LADDER_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# γ on a probability or margin: 1.0 commits nothing by threshold (one token per forward), 0.0 everything.
PROBABILITY_LADDER = (1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
# An entropy bound in nats (`multi_block`; negated for `neg_entropy`): 0 accepts only certain tokens; 12 exceeds
# ln(vocabulary) of every supported backbone (Dream's 152k tokens: 11.9), so it accepts every token of the active
# blocks.
ENTROPY_LADDER = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0)


def knob_speed(decoder: str, knob: float) -> float:
    """A value that grows as a decoder's knob commits more per forward: lower steps or confidence bound γ, a higher
    entropy bound (`multi_block`)."""
    return knob if decoder == "multi_block" else -knob


class EvalDecoderConfig(DecoderConfig):
    """A decoder of the evaluation report, plus the sweep of its knob (all `DecoderConfig` fields apply).

    - `label`: the decoder's name in the report; null uses `name` (set it to tell two settings of one decoder
      apart, e.g. `confident-nocache`).
    - `sweep`: the values of the decoder's knob, one report point each: `steps` for `low_confidence` (whole
      numbers), `threshold` for `confident`, `threshold` and `multi_block`.
      `auto` (default): the adaptive sweep. It starts at the knob's one-token-per-forward value and walks a fixed
      ladder towards the fastest value, stopping after the first value whose accuracy is more than 5 points below
      the first value's (AUP's cut-off, `eval/aup.py`), so every model is swept until its accuracy breaks.
      Ladders: `steps` = blocks x ceil(block_length / k) for k = 1, 2, 3, 4, 6, 8, 12, 16, ... tokens per step
      (a 24-token block: 24, 12, 8, 6, 4, 3, 2, 1 steps); γ of `confident`/`threshold` with `probability` or
      `margin` confidence: 1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0; entropy bound of
      `multi_block`: 0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 8, 12 nats (their negatives for
      `neg_entropy` confidence).
      A list pins the values: each is evaluated, in the order given, without stopping. The report marks the curve
      "cut short" when the list lacks the one-token-per-forward value or ends (short of the ladder's fastest
      value) before accuracy fell past the cut-off. `[]`: one point at the settings given.
      `confident` is one token per forward at γ = 1.0 only with `steps` null; with `steps` set no value is, and
      the report marks its curve cut short.
    """

    label: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")] | None = None
    sweep: Literal["auto"] | list[float] = "auto"

    @model_validator(mode="after")
    def _sweep_values_valid(self) -> EvalDecoderConfig:
        for value in self.pinned:
            try:
                self._setting(value)
            except (ValidationError, ValueError) as error:
                detail = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
                detail = detail.removeprefix("Value error, ")
                raise ValueError(f"sweep value {value}: {detail}") from None
        if len(set(self.pinned)) != len(self.pinned):
            raise ValueError("sweep values must be distinct")
        return self

    @property
    def report_name(self) -> str:
        return self.label or self.name

    @property
    def knob(self) -> str:
        return DECODER_KNOBS[self.name]

    @property
    def pinned(self) -> list[float]:
        """The pinned sweep values; empty for `auto`."""
        return [] if self.sweep == "auto" else self.sweep

    def _setting(self, value: float) -> DecoderConfig:
        if self.knob == "steps":
            if not float(value).is_integer():
                raise ValueError("steps must be a whole number")
            value = int(value)
        fields = self.model_dump(exclude={"label", "sweep"}) | {self.knob: value}
        return DecoderConfig.model_validate(fields)

    def ladder(self, gen_length: int) -> list[float | int]:
        """The knob values of the `auto` sweep on a `gen_length` canvas, from one token per forward to the fastest."""
        if self.knob == "steps":
            block_length = min(self.block_length or gen_length, gen_length)
            blocks = max(gen_length // block_length, 1)
            per_block = [-(-block_length // tokens) for tokens in STEPS_LADDER_TOKENS if tokens < 2 * block_length]
            return [blocks * steps for steps in dict.fromkeys(per_block + [1])]
        if self.name == "multi_block":
            return list(ENTROPY_LADDER)
        if self.confidence == "neg_entropy":
            return [-bound if bound else 0.0 for bound in ENTROPY_LADDER]
        return list(PROBABILITY_LADDER)

    def one_token_knob(self, gen_length: int) -> float | int | None:
        """The knob value that decodes one token per forward (null: none does, `confident` with `steps` set)."""
        if self.name == "confident" and self.steps not in (None, gen_length):
            return None
        return self.ladder(gen_length)[0]

    def faster_or_equal(self, knob: float, other: float) -> bool:
        """Whether knob value `knob` commits at least as much per forward as `other`."""
        return knob_speed(self.name, knob) >= knob_speed(self.name, other)

    def settings(self, gen_length: int | None = None) -> list[tuple[float | int | None, DecoderConfig]]:
        """`(knob value, decoder settings)` for each point of the sweep, in the order evaluated: the pinned values,
        one point at the settings given for `[]`, or the whole `auto` ladder (the evaluation stops it early).

        `gen_length` is the canvas (default: the decoder's own); the `steps` ladder needs one. Without any, an
        `auto` sweep of `steps` gives only its first point, at steps null (one token per forward)."""
        gen_length = gen_length or self.gen_length
        base = self.model_dump(exclude={"label", "sweep"})
        if self.sweep == "auto":
            if gen_length is None and self.knob == "steps":
                return [(None, DecoderConfig.model_validate(base | {"steps": None}))]
            return [(value, self._setting(value)) for value in self.ladder(gen_length)]
        if not self.sweep:
            value = getattr(self, self.knob)
            if value is None and gen_length is not None:  # steps null: one token per forward, reported as such
                value = gen_length
            return [(value, DecoderConfig.model_validate(base | {self.knob: value}))]
        settings = [self._setting(value) for value in self.sweep]
        return [(getattr(setting, self.knob), setting) for setting in settings]


class CheckpointRow(Section):
    """A model checkpoint evaluated as its own report row.

    - `name`: the row's name in the report.
    - `path`: checkpoint directory (`config.json` + weights). Checked when the evaluation starts, so a recipe may
      name checkpoints that an earlier run produces.
    - `autoregressive`: decode it left to right, one token per forward (the AR-baseline rule) instead of with
      the eval decoders; set it for checkpoints trained with causal attention.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")]
    path: PathField
    autoregressive: bool = False


class LmEvalConfig(Section):
    """Standard benchmarks through lm-evaluation-harness (`eval/benchmarks.py`, the `fewstep` model of
    `eval/lm_eval.py`). `distill run` runs it at the end of its eval stage on every eval row, into
    `<run.output_dir>/eval/lm_eval/`; `distill lm-eval` takes the same settings as flags.

    Parameters that choose the harness's tasks and prompts:
    - `tasks`: lm-eval task or group names (`gsm8k`, `minerva_math`, `humaneval`, `mbpp`, ...), or tasks defined
      by the YAML files under `include_path`.
    - `include_path`: a folder of task YAMLs added to the harness's own (lm-eval's `--include_path`); null: none.
    - `num_fewshot`: few-shot examples per prompt; null: each task's own default.
    - `limit`: documents per task: a count (a whole number >= 1) or a fraction of each task (< 1); null: all.
    - `apply_chat_template`: render each prompt (few-shot turns included) in the model's chat template, the format
      fewstep prompts its models in everywhere else; false sends the task's plain text.
    - `fewshot_as_multiturn`: with the chat template, give each few-shot example its own user and assistant turn;
      false joins them into the one user turn.
    - `confirm_run_unsafe_code`: let tasks that execute the generated code (HumanEval, MBPP) run it; the harness
      refuses them otherwise.

    Parameters that control scoring:
    - `sweep`: true: every eval decoder's knob is swept as for the AUP report (`eval.decoder`'s and
      `eval.decoders`' `sweep`), one harness run per knob value (an `auto` sweep stops for each task once its
      accuracy fell past AUP's cut-off), and each task's accuracy and TPF go into `report.{json,md,html}`; only
      generative tasks (`output_type: generate_until`) can be swept. False: one harness run per row with
      `eval.decoder` at its own settings, for any task type (multiple choice too); `<row>/results.json`.
    - `metric`: the harness metric read as accuracy, named as the harness reports it with its filter
      (`exact_match,strict-match`, `acc,none`); null: the first metric each task reports.
    - `mc_num`: Monte-Carlo draws of the masked-diffusion ELBO per loglikelihood request (multiple-choice and
      perplexity tasks); the estimate's standard error falls as 1/sqrt(mc_num), its cost grows as mc_num.
    - `batch_size`: prompts decoded together, and ELBO draws per forward; null: `eval.batch_size`.
    - `gen_length`: the response canvas of the harness's prompts (GSM8K's chains of thought need ~256 tokens);
      null: each decoder's `gen_length`, else `data.max_response_tokens`.
    `distill lm-eval` takes `mc_num`, `batch_size` and `gen_length` as model args, and `sweep` as its `--sweep`.
    """

    tasks: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    include_path: PathField | None = None
    num_fewshot: NonNegativeInt | None = None
    limit: PositiveFloat | None = None
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    confirm_run_unsafe_code: bool = False
    sweep: bool = True
    metric: Annotated[str, Field(min_length=1)] | None = None
    mc_num: PositiveInt = 32
    batch_size: PositiveInt | None = None
    gen_length: PositiveInt | None = None

    _paths_exist = field_validator("include_path")(_existing_path)

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and not float(value).is_integer():
            raise ValueError(f"a count must be a whole number (or a fraction < 1), got {value}")
        return value


EVAL_ROWS = ("teacher", "ar-baseline", "student")


class EvalConfig(Section):
    """Evaluation of teacher / AR baseline / students / checkpoints on the eval splits, and the AUP report.

    - `tasks`: task names to evaluate; null means every task in `data`.
    - `rows`: this run's own models to evaluate: `teacher`, `ar-baseline` (the AR-phase checkpoint, decoded
      left to right with causal attention and one token per forward) and/or `student` (`<run.output_dir>/student`).
    - `checkpoints`: more rows, each a checkpoint directory (see `CheckpointRow`).
    - `decoder`: the first decoder of the report (see `EvalDecoderConfig`: a decoder plus its knob `sweep`).
    - `decoders`: more decoders; every non-autoregressive row is decoded with each of them.
    - `batch_size`: prompts decoded together (recorded in the report; tokens/s depends on it).
    - `max_samples`: cap on eval samples per task (null: the whole split).
    - `alpha`: AUP's α in W(y) = min(exp(-α (1 - y / y_max)), 1), the penalty on accuracy below the best row's.
    - `lm_eval`: standard benchmarks through lm-evaluation-harness on the same rows and decoders, after the
      report (see `LmEvalConfig`); null: none.
    """

    tasks: list[str] | None = None
    rows: list[Literal["teacher", "ar-baseline", "student"]] = ["teacher"]
    checkpoints: list[CheckpointRow] = []
    decoder: EvalDecoderConfig = EvalDecoderConfig()
    decoders: list[EvalDecoderConfig] = []
    batch_size: PositiveInt = 100
    max_samples: PositiveInt | None = None
    alpha: PositiveFloat = 3.0
    lm_eval: LmEvalConfig | None = None

    @model_validator(mode="after")
    def _rows_and_decoders_unique(self) -> EvalConfig:
        names = list(self.rows) + [checkpoint.name for checkpoint in self.checkpoints]
        if not names:
            raise ValueError("give at least one entry in rows or checkpoints")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"row names must be unique, repeated: {', '.join(repeated)}")
        labels = [decoder.report_name for decoder in self.all_decoders()]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"decoder labels must be unique (set `label`), repeated: {', '.join(repeated)}")
        return self

    def all_decoders(self) -> list[EvalDecoderConfig]:
        return [self.decoder, *self.decoders]


# ----------------------------------------------------------------------------------------------------------------
# Sections that later stages fill (kept strict so a key meant for them is never silently ignored)


class TrajectoriesConfig(Section):
    """Pseudo-trajectory generation (d3LLM), `distill trajectories` and the `trajectories` run stage.

    The teacher decodes every training prompt block by block with one token per forward on the
    `data.max_response_tokens` canvas and records, per response position, the step that unmasked it
    (`distill/trajectories.py` has the record schema and storage layout).

    Parameters that control decoding:
    - `choice`: which masked position of the current block each forward commits: `confidence` (highest top-1
      probability, LLaDA's low-confidence remasking) or `entropy` (lowest entropy of the predicted distribution,
      d3LLM's choice).
    - `block_length`: semi-autoregressive block size in tokens (d3LLM uses 32); must divide the canvas, so the
      tiny recipes' 24-token canvas needs e.g. 24, 12 or 8.
    - `temperatures`: decoding temperature of each attempt: a sample the teacher answers wrongly is decoded again
      at the next temperature (d3LLM retries 0.0 -> 0.4); `[0.0]` never retries. Sampling at a temperature
      > 0 draws from a generator seeded by `run.seed`, the temperature and the ids of the samples decoded
      together, so a rerun reproduces every attempt.
    - `batch_size`: prompts decoded together.

    Parameters that control what is kept:
    - `keep`: `all` keeps every sample (the last attempt of those still wrong); `correct` drops samples the teacher
      still got wrong after every temperature.
    - `tokens`: the tokens training pairs with the teacher's order (column `target_ids`): `reference` — the
      dataset's reference response, pad-filled to the canvas as training pads answers ("pseudo" trajectories,
      d3LLM's default) — or `teacher` — the teacher's own final tokens.
    - `max_samples`: use only the first N training records of each task (null: all of them).

    Parameters that control scale and resume:
    - `shards`: the records are split into this many contiguous shards, each written when complete (the unit of
      resume); under `torchrun` rank r decodes the shards i with i % world_size == r. More shards than ranks
      keeps every rank busy and loses less work to a kill.
    """

    choice: Literal["confidence", "entropy"] = "confidence"
    block_length: PositiveInt = 32
    temperatures: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)] = [0.0, 0.4]
    batch_size: PositiveInt = 64
    keep: Literal["all", "correct"] = "all"
    tokens: Literal["reference", "teacher"] = "reference"
    max_samples: PositiveInt | None = None
    shards: PositiveInt = 16

    def check_canvas(self, gen_length: int) -> None:
        """Reject a block length that does not divide the canvas (one-line ValueError)."""
        if gen_length % self.block_length:
            raise ValueError(
                f"trajectories.block_length: {self.block_length} does not divide the {gen_length}-token canvas "
                f"(data.max_response_tokens); pick a divisor of {gen_length}"
            )


class TargetsConfig(Section):
    """Self-distillation-through-time targets (SDTT, Deschenaux & Gulcehre), computed online in training.

    From the student's noisy input x_t the frozen teacher runs 2 decoding steps of `dt` each; every masked
    position takes the distribution of the teacher step that unmasked it (the last step's if neither did), and
    the student's one forward on x_t is matched to it on masked positions (`distill/sdtt.py`).

    - `divergence`: `reverse_kl` KL(student || teacher) (default; the one that kept quality as steps dropped),
      `forward_kl` KL(teacher || student), `mse` (squared error of log-probabilities) or `tvd` (total
      variation distance of the probabilities).
    - `temperature`: temperature the teacher samples its committed tokens at (1.0: ancestral sampling, as in
      SDTT; 0: greedy). Targets are always the temperature-1 distributions.
    - `teacher_steps`: steps of the teacher's sampler over the canvas in the first round (SDTT: 1024), so one
      teacher step unmasks `dt = 1 / teacher_steps` of the canvas (at least one token).
    - `rounds`: SDTT rounds. Each round the student learns to do two teacher steps in one; at the next round the
      student becomes the teacher and dt doubles: 1024 -> 512 -> ... teacher steps. Round r's teacher takes
      `teacher_steps / 2**r` steps; `teacher_steps` must be divisible by `2**rounds`.
    - `steps_per_round`: optimizer steps per round (SDTT: 10k); the round is `step // steps_per_round`, capped
      at `rounds - 1`.
    """

    divergence: Literal["reverse_kl", "forward_kl", "mse", "tvd"] = "reverse_kl"
    temperature: Annotated[float, Field(ge=0)] = 1.0
    teacher_steps: PositiveInt = 1024
    rounds: PositiveInt = 7
    steps_per_round: PositiveInt = 10000

    @model_validator(mode="after")
    def _rounds_fit(self) -> TargetsConfig:
        if self.teacher_steps % 2**self.rounds:
            raise ValueError(
                f"teacher_steps {self.teacher_steps} must be divisible by 2**rounds = {2**self.rounds} "
                f"(the last round's student takes teacher_steps / 2**rounds steps)"
            )
        return self


class LoraConfig(Section):
    """LoRA adapters through peft (d3LLM used r = alpha = 256 on 7B models).

    - `r`: adapter rank. `alpha`: scaling numerator (the update is scaled by alpha / r). `dropout`: on the
      adapter input.
    - `target_modules`: module names to adapt (peft's list of name suffixes); null takes the backbone's default:
      every linear layer of the decoder blocks (`q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj`
      for Dream and Dimple's language model, `q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out` for
      LLaDA), never the output head or Dimple's vision tower.
    """

    r: PositiveInt = 16
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.0
    target_modules: Annotated[list[str], Field(min_length=1)] | None = None


class StudentConfig(Section):
    """How the student is built from the teacher.

    - `kind`: `full` (a trainable copy of every teacher weight) or `lora` (the teacher's weights frozen inside the
      student, only LoRA adapters train; `export` can merge them).
    - `lora`: adapter settings when `kind` is `lora`.
    - `train_vision`: Dimple only: which vision parts of a `full` student train: `none` (default: distillation
      teaches decoding, not seeing; d3LLM and dParallel train the language model only), `projector` or `all`.
      LoRA adapters sit on the language model's blocks only, so a `lora` student's vision part is frozen anyway.

    The teacher itself is never the student: it stays a separate frozen module outside the optimizer.
    """

    kind: Literal["full", "lora"] = "full"
    lora: LoraConfig = LoraConfig()
    train_vision: Literal["all", "projector", "none"] = "none"


# Loss kinds that can train on the task training records instead of the trajectories (`LossTerm.source`).
TASK_SOURCE_KINDS = ("masked_diffusion", "next_token")


class LossTerm(Section):
    """One weighted term of the distillation loss.

    - `kind`: `trajectory_ce` (CE on the window positions masked as the teacher's state, d3LLM),
      `complementary_ce` (CE with the window's mask inverted: a second forward), `certainty_forcing` (entropy of
      softmax(logits / temperature) on masked positions already predicted correctly, on every forward that
      runs; dParallel), `masked_diffusion` (plain masked-diffusion CE on the reference tokens, a regulariser),
      `next_token` (the AR anchor of teacher pretraining, `teacher.pretrain.ar_anchor_weight`: next-token CE with
      causal attention on the trajectory's tokens, a regulariser that keeps the computation an anchored teacher
      relies on; a third forward),
      `sdtt` (self-distillation through time: the student's one forward matched to two steps of the frozen
      teacher, with the divergence, dt and rounds of `targets`). `sdtt` trains on the task training sequences
      (prompt, reference response, answer padding; the response is masked by the loss itself), not on a
      trajectory set, so it is the only term of its run and its `distill` stage needs no `trajectories` stage.
    - `weight`: multiplier of the term.
    - `temperature`: softmax temperature of `certainty_forcing` (0.5 in dParallel/d3LLM); unused by other kinds.
    - `source`: what the regularisers `masked_diffusion` and `next_token` train on: `trajectories` (the
      trajectory's tokens, in the trajectory batch) or `task` (their own micro-batch of the task training records,
      drawn as teacher pretraining draws them: the reference response with answer padding, so the term is the
      teacher's own pretraining loss on the whole training split, not on the few thousand prompts that have
      trajectories). The other kinds only have `trajectories` (`sdtt` reads the task records by itself).
    - `prefix_fraction`, `prefix_block`: `masked_diffusion` only: that share of its rows noised as a block decoder
      sees its canvas and scored on the block, as `teacher.pretrain.prefix_fraction` does for the teacher (the
      term is then the teacher's whole pretraining loss). Measured on the benchmark: it cost the student 5-7
      points in blocks of 32, so the benchmark keeps 0 (docs/benchmark.md §8).
    """

    kind: Literal["trajectory_ce", "complementary_ce", "certainty_forcing", "masked_diffusion", "next_token", "sdtt"]
    weight: PositiveFloat = 1.0
    temperature: PositiveFloat = 0.5
    source: Literal["trajectories", "task"] = "trajectories"
    prefix_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    prefix_block: Annotated[int, Field(ge=1)] = DEFAULT_PREFIX_BLOCK

    @model_validator(mode="after")
    def _source_of_regulariser(self) -> LossTerm:
        if self.source == "task" and self.kind not in TASK_SOURCE_KINDS:
            raise ValueError(
                f"source: task is for the regularisers {' and '.join(TASK_SOURCE_KINDS)}; {self.kind} trains on "
                "trajectories"
            )
        if self.prefix_fraction and self.kind != "masked_diffusion":
            raise ValueError(f"prefix_fraction is for the masked_diffusion term; {self.kind} has no noising")
        if unused_prefix_block(self.prefix_fraction, self.prefix_block):
            raise ValueError(
                "prefix_block sizes the block rows of prefix_fraction; set prefix_fraction > 0 on a masked_diffusion "
                "term, or drop prefix_block"
            )
        return self


class CurriculumConfig(Section):
    """d3LLM's curriculum over pseudo-trajectory inputs.

    - `floor_start` -> `floor_end`: the floor of the mask ratio t rises linearly over the run (d3LLM: 0 -> 0.8);
      t ~ U[floor, t_max].
    - `t_max`: upper bound of t (d3LLM: 0.8).
    - `windows`: window (block) size per epoch, the last holding afterwards (d3LLM: 16, 24, 32); each must
      divide the response canvas.
    """

    floor_start: Fraction = 0.0
    floor_end: Fraction = 0.8
    t_max: Fraction = 0.8
    windows: Annotated[list[PositiveInt], Field(min_length=1)] = [16, 24, 32]

    @model_validator(mode="after")
    def _floor_below_max(self) -> CurriculumConfig:
        if max(self.floor_start, self.floor_end) > self.t_max:
            raise ValueError("floor_start and floor_end must not exceed t_max")
        return self


class DistillConfig(Section):
    """Distillation losses and curriculum (d3LLM's recipe by default).

    - `losses`: weighted terms summed into the loss; the default is d3LLM's
      `[CE(m) + CE(not m) + lambda * (H(m) + H(not m))] / 4` with lambda = 1.
    - `curriculum`: mask-ratio floor and window schedule (trajectory terms only; unused by `sdtt`).
    """

    losses: Annotated[list[LossTerm], Field(min_length=1)] = [
        LossTerm(kind="trajectory_ce", weight=0.25),
        LossTerm(kind="complementary_ce", weight=0.25),
        LossTerm(kind="certainty_forcing", weight=0.25),
    ]
    curriculum: CurriculumConfig = CurriculumConfig()

    @model_validator(mode="after")
    def _kinds_unique(self) -> DistillConfig:
        kinds = [term.kind for term in self.losses]
        repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if repeated:
            raise ValueError(f"each loss kind may appear once, repeated: {', '.join(repeated)}")
        return self

    @field_validator("losses")
    @classmethod
    def _sdtt_alone(cls, losses: list[LossTerm]) -> list[LossTerm]:
        others = [term.kind for term in losses if term.kind != "sdtt"]
        if others and len(others) < len(losses):
            raise ValueError(
                "sdtt is the only term of its run (it trains on task sequences, the other terms on trajectories); "
                f"remove {', '.join(others)}"
            )
        return losses

    @property
    def is_sdtt(self) -> bool:
        """Whether this is an SDTT run (task sequences and teacher rounds) rather than a trajectory run."""
        return any(term.kind == "sdtt" for term in self.losses)

    @property
    def reads_task_records(self) -> bool:
        """Whether training reads the task training records: an SDTT run, or a term with `source: task`."""
        return self.is_sdtt or any(term.source == "task" for term in self.losses)


class ExportConfig(Section):
    """Export of the distilled student (`distill export`, and the `export` stage of a run).

    The export is a Hugging Face folder: sharded safetensors, `config.json` with `auto_map` and the modeling files
    beside it (so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without fewstep), the tokenizer,
    `generation_config.json` with the decoding defaults, a model card, and `verify.json` (`distill/export.py`).
    `distill export RUN_DIR` takes these values from the run's recipe unless a flag overrides them.

    - `checkpoint`: which complete distillation checkpoint of `<run>/distill/checkpoints` to export: `latest` or
      an optimizer step.
    - `merge_lora`: fold a LoRA student's adapters into the weights (true), or write the teacher's weights with
      the adapters beside them as a peft folder `adapter/` (false). Unused for a full student.
    - `dtype`: weights dtype of the export: `fp32` (the consolidated weights unrounded; ZeRO 1-3 keep an fp32
      master copy even in bf16 training) or `bf16` (half the size; verified to a relative logit tolerance,
      `distill/verify.py`).
    - `max_shard_size`: largest safetensors shard, bytes or a size such as `5GB`, `500MB`, `200KiB`.
    - `verify`: after writing, reload the folder in a fresh Python process that cannot import fewstep, compare
      its logits with the checkpoint's student and its `diffusion_generate` with fewstep's decoder, and fail
      the export on a mismatch.
    - `out_dir`: the export folder; null means `<run.output_dir>/export`.
    - `overwrite`: whether the `export` stage replaces an existing export folder (true: a rerun replaces the
      run's own export; the old folder is removed only once the new one is complete). `distill export` never
      overwrites without `--overwrite`.
    """

    checkpoint: Literal["latest"] | PositiveInt = "latest"
    merge_lora: bool = True
    dtype: Literal["fp32", "bf16"] = "fp32"
    max_shard_size: PositiveInt | Annotated[str, Field(pattern=r"^[0-9]+(GB|MB|KB|GiB|MiB|KiB)$")] = "5GB"
    verify: bool = True
    out_dir: PathField | None = None
    overwrite: bool = True


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

    @model_validator(mode="after")
    def _eval_decoders_fit(self) -> Recipe:
        # The canvas is only known here (data.max_response_tokens), so block/step splits are checked at this level.
        for index, decoder in enumerate(self.eval.all_decoders()):
            where = "eval.decoder" if index == 0 else f"eval.decoders.{index - 1}"
            gen_length = decoder.gen_length or self.data.max_response_tokens
            for value, setting in decoder.settings(gen_length):
                try:
                    setting.check_lengths(gen_length)
                except ValueError as error:
                    at = f" (sweep value {value})" if decoder.pinned else ""
                    raise ValueError(f"{where}: {error}{at}") from None
        return self

    @model_validator(mode="after")
    def _lm_eval_decoders_fit(self) -> Recipe:
        # `eval.lm_eval.gen_length` replaces every decoder's canvas for the harness's prompts.
        canvas = self.eval.lm_eval.gen_length if self.eval.lm_eval is not None else None
        for index, decoder in enumerate(self.eval.all_decoders() if canvas else []):
            for value, setting in decoder.settings(canvas):
                try:
                    setting.check_lengths(canvas)
                except ValueError as error:
                    at = f" (sweep value {value})" if decoder.pinned else ""
                    where = "eval.decoder" if index == 0 else f"eval.decoders.{index - 1}"
                    raise ValueError(f"eval.lm_eval.gen_length: {where}: {error}{at}") from None
        return self

    @model_validator(mode="after")
    def _curriculum_windows_fit(self) -> Recipe:
        if "distill" in self.run.stages and not self.distill.is_sdtt:
            canvas = self.data.max_response_tokens
            for window in self.distill.curriculum.windows:
                if canvas % window:
                    raise ValueError(
                        f"distill.curriculum.windows: window {window} does not divide the {canvas}-token canvas "
                        "(data.max_response_tokens)"
                    )
        return self

    @model_validator(mode="after")
    def _sdtt_keeps_full_replicas(self) -> Recipe:
        # SDTT copies the student into the teacher at each round boundary, which needs the whole student on a rank.
        if "distill" in self.run.stages and self.distill.is_sdtt and self.train.zero_stage == 3:
            raise ValueError(
                "train.zero_stage: sdtt copies the student into the teacher at each round boundary and needs full "
                "replicas; use ZeRO stage 0-2 (e.g. train.deepspeed=zero2_offload)"
            )
        return self

    @model_validator(mode="after")
    def _trajectory_blocks_fit(self) -> Recipe:
        # Checked only when the stage runs: recipes without it keep the default block length on any canvas.
        # `distill trajectories` runs the same check itself.
        if "trajectories" in self.run.stages:
            self.trajectories.check_canvas(self.data.max_response_tokens)
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML itself silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by the mapping's own keys
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first given on line {first_line[key]})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _check_finite(tree: Any, path: str = "") -> None:
    """Refuse NaN and infinity anywhere in the raw tree (`train.lr=.inf`), free-form sections included."""
    if isinstance(tree, float) and not math.isfinite(tree):
        raise RecipeError(f"{path or 'recipe'}: {tree} is not a finite number")
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        _check_finite(value, f"{path}.{key}" if path else str(key))


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
        value = _load_yaml(raw) if raw != "" else ""
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
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
        ) from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror or type(error).__name__})") from None
    try:
        tree = _load_yaml(text)
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
    _check_finite(tree)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        raise RecipeError(_format_validation_error(error)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
