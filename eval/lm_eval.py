"""fewstep's model for lm-evaluation-harness: any fewstep checkpoint answers the harness's three request types.

lm-eval (a pinned dependency, never vendored) scores a model on GSM8K, MATH, HumanEval, MBPP, ... through an
`lm_eval.api.model.LM`; `FewstepLM` is one, registered as `fewstep` when this module is imported (the harness has
no plugin discovery: `distill lm-eval` imports it, `eval/benchmarks.py` runs the harness). It is built from an
exported folder, a run's teacher or student, or any checkpoint `load_teacher` reads:

- `generate_until`: the decoding engine (`distill.decoding.decode`) with any decoder and knob, `batch_size` prompts
  at a time in the harness's order with one seeded generator (so a run repeats `distill eval`'s batches on the same
  prompts). The text is cut at the response terminator, then before the first of the request's `until` strings.
  Each request's NFE and generated tokens are recorded in `measurements`; TPF counts the tokens the engine
  generated before the terminator, as `distill eval` does, not the text left after an `until` cut. The decoder's
  own settings govern sampling and length: a request's `do_sample`, `temperature` and `max_gen_toks` are not used.
- `loglikelihood`: the masked-diffusion ELBO, a lower bound of log p(continuation | context) estimated by Monte
  Carlo (`masked_elbo`), so multiple-choice tasks work; a causal checkpoint (the AR baseline) is scored exactly,
  token by token, as its AR phase was trained.
- `loglikelihood_rolling`: the same over the harness's rolling windows of the text (perplexity tasks).

Prompts are the harness's strings, encoded as they are: with the harness's `apply_chat_template` they arrive
rendered by this model's chat template (`apply_chat_template`), the format fewstep prompts its models in.

Model args (`distill lm-eval --model-args k=v,...`, the harness's `model_args`), resolved by `model_settings`
without loading weights, so a bad one is refused before any work:

- `pretrained`: a checkpoint folder (`config.json`), an export, or a run directory (`recipe.yaml`).
- `row`: in a run directory, the model to load (`student` by default, `teacher`, `ar-baseline`); it names the
  model in reports (a folder is named after itself).
- `decoder`: the decoder's name (`low_confidence`, `confident`, `threshold`, `multi_block`); every other
  `DecoderConfig` field is a model arg too (`threshold=`, `steps=`, `block_length=`, `gen_length=`, `cache=`, ...),
  validated by the recipe's own class. Defaults: an export's decoding defaults (`export.json`), else the run
  recipe's first eval decoder (its canvas `data.max_response_tokens` when it sets none), else the decoder's own
  with a 256-token canvas; naming another decoder starts from that decoder's defaults, the canvas kept.
- `batch_size` (32, or the run recipe's `eval.batch_size`): prompts per decode, ELBO draws per forward.
- `mc_num` (32): ELBO draws per loglikelihood request. `seed` (0): decoding and ELBO noise.
- `dtype` (`fp32` or `bf16`), `device` (`cuda` when there is one, else `cpu`). `max_batch_size` is ignored.

The module runs past 400 lines on purpose: the model args are declared and resolved beside the model that takes
them, and both likelihood estimators sit beside the requests they answer.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (see below: the harness's own models, registered first)
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from pydantic import ValidationError

from distill.decoding import check_config, decode
from distill.recipe import DECODER_NAMES, DecoderConfig
from teachers.interface import DTYPES, Teacher, load_teacher

DEFAULT_GEN_LENGTH = 256  # canvas when neither the model args, an export nor a run recipe give one
# Longest text scored in one piece (`loglikelihood_rolling` windows, truncated contexts): each ELBO draw is a forward
# over it, so a 131k-position Dream is not asked for 131k-token forwards.
MAX_SCORED_TOKENS = 4096
# The model args that are not decoder settings, with their defaults (None: resolved from the checkpoint).
OWN_ARGS = {
    "pretrained": None,
    "row": None,
    "decoder": None,
    "batch_size": None,
    "mc_num": 32,
    "seed": 0,
    "dtype": "fp32",
    "device": None,
    "max_batch_size": None,
}
EXPORT_FILE = "export.json"  # `distill export`'s provenance, whose `decoder` holds the export's decoding defaults
RUN_RECIPE = "recipe.yaml"  # the resolved recipe `distill run` writes into a run directory


# ----------------------------------------------------------------------------------------------------------------
# Model args


@dataclass
class ModelSettings:
    """What a `FewstepLM` is built from: a checkpoint and how it decodes and scores."""

    checkpoint: Path
    name: str  # the model's name in reports
    decoder: DecoderConfig  # `gen_length` set: the canvas of every prompt
    batch_size: int = 32
    mc_num: int = 32
    seed: int = 0
    dtype: str = "fp32"
    device: str | None = None


def parse_model_args(text: str) -> dict[str, Any]:
    """`k=v,k=v` (the harness's syntax) as a dict, each value parsed as YAML like a recipe override
    (`threshold=0.9` is a number, `cache=none` the string)."""
    args = {}
    for item in (part for part in text.split(",") if part.strip()):
        key, sign, value = item.partition("=")
        if not sign or not key.strip():
            raise ValueError(f"model_args: '{item}' is not key=value")
        try:
            args[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            args[key.strip()] = value
    return args


def _integer(args: dict[str, Any], name: str, minimum: int) -> int:
    value = args[name]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # the harness passes its own --batch_size as text
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model_args: {name} must be a whole number >= {minimum}, got {args[name]!r}")
    return value


def _default_decoder(checkpoint: Path) -> tuple[dict[str, Any], int | None]:
    """The decoder settings a checkpoint comes with, and the run's eval batch size: an export's decoding defaults,
    else its run's first eval decoder (a run directory, or a run's `teacher/`/`student/`), else none."""
    export = checkpoint / EXPORT_FILE
    if export.is_file():
        try:
            return dict(json.loads(export.read_text())["decoder"]), None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"model_args: pretrained: {export} holds no decoder settings") from None
    for run_recipe in (checkpoint / RUN_RECIPE, checkpoint.parent / RUN_RECIPE):
        if run_recipe.is_file():
            # Read as written (not re-validated: paths it names may have moved since the run); the decoder alone
            # is validated below.
            try:
                tree = yaml.safe_load(run_recipe.read_text()) or {}
                decoder = {k: v for k, v in tree["eval"]["decoder"].items() if k not in ("label", "sweep")}
                decoder["gen_length"] = decoder.get("gen_length") or tree["data"]["max_response_tokens"]
                return decoder, tree["eval"].get("batch_size")
            except (yaml.YAMLError, KeyError, TypeError, AttributeError):
                raise ValueError(f"model_args: pretrained: {run_recipe} is not a fewstep run recipe") from None
    return {}, None


def model_settings(args: dict[str, Any]) -> ModelSettings:
    """Resolve and validate model args (see the module docstring) without loading weights; a one-line ValueError
    (`model_args: ...`) names the first bad one."""
    args = dict(args)
    if args.get("pretrained") in (None, ""):
        raise ValueError("model_args: pretrained= is required (a checkpoint folder, an export or a run directory)")
    path = Path(str(args["pretrained"]))
    row = args.get("row")
    if (path / "config.json").is_file():
        checkpoint = path
    elif (path / RUN_RECIPE).is_file():
        checkpoint = path / str(row or "student")
        if not (checkpoint / "config.json").is_file():
            raise ValueError(f"model_args: row: the run {path} has no model '{row or 'student'}' ({checkpoint})")
    else:
        raise ValueError(f"model_args: pretrained: {path} is not a checkpoint, an export or a run directory")
    base, run_batch_size = _default_decoder(checkpoint)

    decoder = args.get("decoder")
    if isinstance(decoder, DecoderConfig):  # from code (a recipe's decoder), taken as it is
        settings = decoder.model_dump(exclude={"label", "sweep"})
    else:
        if decoder is not None and decoder not in DECODER_NAMES:
            raise ValueError(f"model_args: decoder: '{decoder}' is not a decoder (one of {', '.join(DECODER_NAMES)})")
        if decoder is not None and decoder != base.get("name", "low_confidence"):
            base = {"gen_length": base.get("gen_length")}  # another decoder: its own defaults, the same canvas
        settings = base | ({"name": decoder} if decoder is not None else {})
    own = {key: args.pop(key) for key in list(args) if key in OWN_ARGS}
    own = OWN_ARGS | {key: value for key, value in own.items() if value is not None}
    if args.get("cache", "") is None:
        args["cache"] = "none"  # the harness's own parser reads `cache=none` as None
    unknown = sorted(set(args) - set(DecoderConfig.model_fields) - {"name"})
    if unknown or "name" in args:
        bad = (unknown or ["name"])[0]
        raise ValueError(
            f"model_args: unknown argument '{bad}' (fewstep's: {', '.join(OWN_ARGS)}; decoder settings: "
            f"{', '.join(name for name in DecoderConfig.model_fields if name != 'name')})"
        )
    settings |= args
    settings["gen_length"] = settings.get("gen_length") or DEFAULT_GEN_LENGTH
    try:
        config = DecoderConfig.model_validate(settings)
        check_config(config, config.gen_length)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "decoder"
        raise ValueError(f"model_args: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    except ValueError as error:
        raise ValueError(f"model_args: {error}") from None
    if own["dtype"] not in DTYPES:
        raise ValueError(f"model_args: dtype must be one of {', '.join(DTYPES)}, got {own['dtype']!r}")
    if own["batch_size"] is None:
        own["batch_size"] = run_batch_size or 32
    return ModelSettings(
        checkpoint=checkpoint,
        name=str(row) if row else checkpoint.name,
        decoder=config,
        batch_size=_integer(own, "batch_size", 1),
        mc_num=_integer(own, "mc_num", 1),
        seed=_integer(own, "seed", 0),
        dtype=own["dtype"],
        device=None if own["device"] is None else str(own["device"]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Likelihoods


def _is_causal(teacher: Teacher) -> bool:
    return bool(getattr(teacher.model.config, "causal", False))


@torch.no_grad()
def masked_elbo(
    teacher: Teacher,
    context: list[int],
    continuation: list[int],
    draws: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[float, bool]:
    """A Monte-Carlo estimate of the masked-diffusion ELBO, a lower bound of log p(continuation | context), and
    whether one-step greedy decoding gives the continuation.

    LLaDA's likelihood evaluation (Nie et al. 2025, Eq. 6, the lower-variance form of Eq. 3): per draw, mask
    l ~ U{1, ..., L} of the L continuation tokens (mask ratio t = l / L in (0, 1], at least one token), chosen
    uniformly; one forward of the bidirectional model on context + partly masked continuation; the log-probabilities
    of the true tokens at the masked positions, summed and weighted by 1/t = L / l. The estimate is the mean over
    `draws` draws (`batch_size` per forward), each drawn from `generator`:

        log p(x | c) >= E_l E_{M, |M| = l} [ (L / l) sum_{i in M} log p_theta(x_i | c, x with M masked) ]

    `is_greedy` (the harness's second value): one more forward with the whole continuation masked, True when its
    argmax at every position is the continuation's token (what a one-step greedy fill would commit).
    """
    length = len(continuation)
    if length == 0:
        return 0.0, True
    start = len(context)
    ids = torch.tensor(context + continuation, dtype=torch.long)
    counts = torch.randint(1, length + 1, (draws,), generator=generator)
    ranks = torch.rand(draws, length, generator=generator).argsort(-1).argsort(-1)
    # Row 0 masks every continuation token (the greedy check); rows 1.. are the draws.
    masked = torch.cat([torch.ones(1, length, dtype=torch.bool), ranks < counts[:, None]])
    weights = torch.cat([torch.zeros(1), length / counts.double()])
    targets = ids[start:].to(teacher.device)
    total, greedy = 0.0, False
    for rows in torch.arange(draws + 1).split(batch_size):
        noisy = ids.repeat(len(rows), 1)
        noisy[:, start:][masked[rows]] = teacher.mask_token_id
        logits = teacher.forward(noisy.to(teacher.device), start=start).float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.expand(len(rows), -1)[..., None])[..., 0]
        scored = (log_probs * masked[rows].to(log_probs.device)).sum(-1).double().cpu()
        total += float((scored * weights[rows]).sum())
        if rows[0] == 0:
            greedy = bool((logits[0].argmax(-1) == targets).all())
    return total / draws, greedy


@torch.no_grad()
def causal_loglikelihood(teacher: Teacher, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) of a causal checkpoint, exactly: the aligned logits of one causal forward on
    context + continuation score each token from the tokens before it (the AR phase's loss, `distill/pretrain.py`).
    """
    if not continuation:
        return 0.0, True
    ids = torch.tensor([context + continuation], dtype=torch.long, device=teacher.device)
    logits = teacher.forward(ids, start=len(context), causal=True)[0].float()
    targets = ids[0, len(context) :]
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    return float(log_probs.sum()), bool((logits.argmax(-1) == targets).all())


def request_generator(seed: int, *texts: str) -> torch.Generator:
    """A generator seeded by `seed` and the request itself, so an estimate depends on neither batch nor order."""
    digest = hashlib.sha256(json.dumps([seed, *texts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ----------------------------------------------------------------------------------------------------------------
# The model


# The harness fills its model registry with its own models only while the registry is empty, so `lm_eval.models` is
# imported above, before `fewstep` joins it: `hf`, `vllm`, ... stay available in the same process.
@register_model("fewstep")
class FewstepLM(LM):
    """A fewstep checkpoint as an lm-eval model (see the module docstring).

    `FewstepLM(pretrained=..., **model_args)` is how the harness builds it; `FewstepLM.from_settings` takes resolved
    settings (and an already loaded teacher). `decoder` may be changed between harness runs (a knob sweep), and
    `measurements` holds one entry per generation request since it was last cleared: `task`, `doc_id`, `nfe`,
    `generated` (tokens before the terminator), `seconds` (its share of its batch's decode time), `output`.
    """

    def __init__(self, pretrained: str | None = None, **model_args: Any) -> None:
        settings = model_settings({"pretrained": pretrained, **model_args})
        self._setup(settings, None)

    @classmethod
    def from_settings(cls, settings: ModelSettings, teacher: Teacher | None = None) -> FewstepLM:
        model = cls.__new__(cls)
        model._setup(settings, teacher)
        return model

    def _setup(self, settings: ModelSettings, teacher: Teacher | None) -> None:
        super().__init__()
        if teacher is None:
            teacher = load_teacher(None, settings.checkpoint, settings.dtype, settings.device)
        self.settings = settings
        self.teacher = teacher
        self.decoder = settings.decoder
        self.measurements: list[dict[str, Any]] = []
        self._device = teacher.device

    # -- what the harness reads -------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.teacher.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    @property
    def max_length(self) -> int | None:
        return getattr(self.teacher.model.config, "max_position_embeddings", None)

    @property
    def scored_tokens(self) -> int:
        """Tokens of one likelihood forward: the model's positions, at most `MAX_SCORED_TOKENS`."""
        return min(self.max_length or MAX_SCORED_TOKENS, MAX_SCORED_TOKENS)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation in the model's chat template, as text (the harness encodes nothing itself)."""
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- generate_until -----------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        generator = torch.Generator().manual_seed(self.settings.seed)
        gen_length = self.decoder.gen_length or DEFAULT_GEN_LENGTH
        # A prompt longer than the positions left beside the canvas keeps its end (as the harness's HF model does).
        room = None if self.max_length is None else max(self.max_length - gen_length, 1)
        outputs = []
        batch_size = self.settings.batch_size
        for first in range(0, len(requests), batch_size):
            chunk = requests[first : first + batch_size]
            began = time.perf_counter()
            prompts = [self.encode(request.args[0])[-room if room else 0 :] for request in chunk]
            result = decode(self.teacher, prompts, self.decoder, gen_length, generator)
            seconds = (time.perf_counter() - began) / len(chunk)
            for index, request in enumerate(chunk):
                text = cut_at_stops(self.teacher.decode_response(result.tokens[index].tolist()), request.args[1])
                self.measurements.append(
                    {
                        "task": request.task_name,
                        "doc_id": request.doc_id,
                        "nfe": int(result.nfe[index]),
                        "generated": int(result.generated[index]),
                        "seconds": seconds,
                        "output": text,
                    }
                )
                self.cache_hook.add_partial("generate_until", request.args, text)
                outputs.append(text)
        return outputs

    # -- likelihoods --------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, context: list[int], continuation: list[int], key: tuple) -> tuple[float, bool]:
        if not context:
            # Nothing to condition on: the BOS (else EOS) token, as the harness's models prefix.
            context = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id]
        # A context too long for the positions keeps its end.
        context = context[-max(self.scored_tokens - len(continuation), 1) :]
        if _is_causal(self.teacher):
            return causal_loglikelihood(self.teacher, context, continuation)
        generator = request_generator(self.settings.seed, *key)
        return masked_elbo(
            self.teacher, context, continuation, self.settings.mc_num, self.settings.batch_size, generator
        )

    @property
    def eos_id(self) -> int:
        return self.teacher.eos_token_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split where the tokenizer splits their concatenation (the context's trailing
        spaces move to the continuation, so a word keeps its leading space)."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return whole[: len(context_ids)], whole[len(context_ids) :]

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            result = self._loglikelihood_tokens(*self.encode_pair(context, continuation), (context, continuation))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """The text's log-likelihood summed over the harness's disjoint rolling windows (each window's tokens scored
        given the text before it, `scored_tokens` in all)."""
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id
        window = self.scored_tokens - 1
        results = []
        for request in requests:
            (text,) = request.args[:1]
            total = 0.0
            for index, pair in enumerate(get_rolling_token_windows(self.encode(text), prefix, window, 1)):
                context, continuation = make_disjoint_window(pair)
                total += self._loglikelihood_tokens(context, continuation, (text, str(index)))[0]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results


def cut_at_stops(text: str, gen_kwargs: dict[str, Any]) -> str:
    """`text` before the first occurrence of any of the request's `until` strings."""
    until = gen_kwargs.get("until") or []
    for stop in [until] if isinstance(until, str) else until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
