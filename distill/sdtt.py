"""Self-distillation through time (SDTT, Deschenaux & Gulcehre): teacher targets from two teacher decoding steps,
the student's loss against them, and the multi-round schedule in which the student becomes the teacher.

Targets (`sdtt_targets`), computed online inside training: from the student's noisy input x_t the frozen teacher
runs `TEACHER_STEPS` = 2 decoding steps. A step is one teacher forward, then a commit of `dt` masked response
positions chosen as the `low_confidence` decoder chooses them (a candidate token per position from
`distill.decoding.sample_tokens`, positions ranked by the probability of their candidate). A position unmasked at
step j takes step j's distribution (the softmax of the teacher's aligned logits at that step) as its target;
positions still masked after both steps take the last step's. The student makes one forward on x_t and is compared
with the targets on the positions masked in x_t only (`sdtt_loss`, with a divergence of `distill.losses`).

Rounds (`sdtt_round`, `TeacherRounds`). Round r covers optimizer steps [r*N, (r+1)*N), N = `steps_per_round`
(the last round never ends). Round r's teacher samples with `teacher_steps / 2**r` steps, i.e. one teacher step
unmasks dt = 2**r / teacher_steps of the canvas, and the student learns to do two of them in one forward:
1024 -> 512 -> ... -> 16 teacher steps, students of 512 -> ... -> 8 steps, over SDTT's 7 rounds. At each round
boundary the student's weights are copied into the teacher.

Resume contract. The round is a pure function of the optimizer step, and the trainer checkpoints the optimizer
step, so a resumed run lands in the right round (and dt, and effective steps) with no state of its own. The one
thing a resume cannot recompute is the current round's teacher weights, since the student has trained on since
the boundary; so `TeacherRounds` saves each round's teacher when the round starts, as `<rounds_dir>/round-XX/`
(a `from_pretrained` checkpoint plus `round.json`: round, first step, dt, teacher and student steps), and on
resume loads the saved teacher of the current round. A resume exactly at a boundary copies the student, which the
trainer has just restored to that step. The loss function learns the optimizer step from its batch: the batch
function puts `step = m // gradient_accumulation_steps` (m: the global micro-batch index, `distill.trainer`) into
the batch, and the round, dt and teacher steps are returned as metrics, so the trainer logs them every step.

Not built here: precomputing top-k teacher log-probs for fixed (x_t, t) into Arrow shards (for teachers too large
to run beside the student).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill.decoding import confidence_of, sample_tokens, top_positions
from distill.files import write_json
from distill.losses import (
    chunk_size,
    forward_kl,
    log_prob_mse,
    loss_start,
    mask_tokens,
    per_position,
    reverse_kl,
    total_variation,
)
from distill.recipe import DecoderConfig, TargetsConfig
from teachers.interface import Teacher, save_teacher
from teachers.vision import vision_of

TEACHER_STEPS = 2  # SDTT's teacher takes two steps per student step
SDTT_ROUNDS_DIR = "sdtt-rounds"  # under the distillation phase directory
DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "mse": log_prob_mse,
    "tvd": total_variation,
}


# ----------------------------------------------------------------------------------------------------------------
# Targets and loss


@dataclass
class SDTTTargets:
    """What the teacher's two steps from x_t produced."""

    log_probs: torch.Tensor  # [B, T - start, V] float32 target log-distribution of positions start.. (finite)
    unmasked_at: torch.Tensor  # [B, T] teacher step (0 or 1) that unmasked the position; -1 if neither did
    x_s: torch.Tensor  # [B, T] ids after the two teacher steps
    start: int = 0  # the column `log_probs` starts at


def tokens_per_step(response_mask: torch.Tensor, dt: int | float) -> torch.Tensor:
    """[B] positions one teacher step unmasks: `dt` itself for an int, else `ceil(dt * response length)` for a
    fraction dt in (0, 1] of each sample's response canvas; at least 1."""
    lengths = response_mask.bool().sum(-1)
    if isinstance(dt, int):
        if dt < 1:
            raise ValueError(f"dt: a token count must be >= 1, got {dt}")
        return torch.full_like(lengths, dt)
    if not 0 < dt <= 1:
        raise ValueError(f"dt: a fraction of the canvas must lie in (0, 1], got {dt}")
    return torch.ceil(lengths.double() * dt).long().clamp(min=1)


@torch.no_grad()
def sdtt_targets(
    teacher: Teacher,
    x_t: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    dt: int | float,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    vision: dict[str, torch.Tensor] | None = None,
    start: int = 0,
) -> SDTTTargets:
    """The teacher's targets for the student's input `x_t` `[B, T]` (masked response positions hold the mask id).

    Each of the `TEACHER_STEPS` steps: a teacher forward on the current ids (`attention_mask` `[B, T]`), then
    `tokens_per_step(response_mask, dt)` masked response positions are committed, ranked as `low_confidence`
    ranks them, with candidate tokens sampled at `temperature` from `generator` (0: greedy). Targets are the
    temperature-1 log-softmax of the aligned logits (the mask token keeps its small mass, so every target is
    finite); the mask token is never committed, as in the decoding engine. `vision` holds the rows' images
    (`pixel_values`, `image_grid_thw`), encoded by the teacher's vision tower once for all its steps.

    `start` is the first column scored, at most `distill.losses.loss_start(response_mask)` (a response position
    before it is a ValueError): the float32 `[B, T - start, V]` targets and the sampling's intermediates then do not
    grow with the prompt. Sampled candidates (`temperature` > 0) draw their noise over those columns, chunk by chunk.
    """
    response = response_mask.bool()
    if response[:, :start].any():
        raise ValueError(f"sdtt_targets: start {start} lies past the first response position")
    config = DecoderConfig(name="low_confidence", temperature=temperature)
    count = tokens_per_step(response_mask, dt)
    x = x_t.clone()
    unmasked_at = torch.full_like(x_t, -1)
    log_probs = None
    images = {}
    if vision:
        features = teacher.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"])
        images = {"image_features": features, "image_grid_thw": vision["image_grid_thw"]}
    for step in range(TEACHER_STEPS):
        masked = ((x == teacher.mask_token_id) & response)[:, start:]
        logits = teacher.forward(x, attention_mask, start=start, **images)
        if log_probs is None:
            log_probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        # Positions unmasked at an earlier step keep that step's target; every other position takes this one's.
        fresh = (unmasked_at[:, start:] < 0)[..., None]
        # By chunks of positions, so the float32 (and, sampling, float64) [B, c, V] intermediates stay small and
        # the targets, written in place, are the one [B, W, V] float32 tensor held.
        size = chunk_size(logits.shape[1])
        tokens, confidence = [], []
        chunks = zip(logits.split(size, 1), log_probs.split(size, 1), fresh.split(size, 1), strict=True)
        for chunk, target, chunk_fresh in chunks:
            chunk = chunk.float()
            target.copy_(torch.where(chunk_fresh, torch.log_softmax(chunk, dim=-1), target))
            chunk[..., teacher.mask_token_id] = -torch.inf
            chunk_tokens, probs = sample_tokens(chunk, config, generator)
            tokens.append(chunk_tokens)
            confidence.append(confidence_of(probs, chunk_tokens, "probability"))
        tokens = torch.cat(tokens, dim=1)
        commit = top_positions(torch.cat(confidence, dim=1), masked, count)
        x[:, start:] = torch.where(commit, tokens, x[:, start:])
        unmasked_at[:, start:] = torch.where(commit, step, unmasked_at[:, start:])
    return SDTTTargets(log_probs=log_probs, unmasked_at=unmasked_at, x_s=x, start=start)


def sdtt_loss(
    student_logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, divergence: str = "reverse_kl"
) -> torch.Tensor:
    """Mean divergence between the student and the teacher targets over the positions masked in x_t.

    `student_logits [B, W, V]` (aligned), `targets [B, W, V]` teacher log-probabilities (`SDTTTargets.log_probs`),
    `masked [B, W]`, over the same W columns; `divergence` names a function of `DIVERGENCES`:
    `loss = sum_{b,i masked} D(p_s[b,i], p_t[b,i]) / |masked|`, computed in chunks of positions (`per_position`).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{divergence}' (known: {', '.join(DIVERGENCES)})")
    masked = masked.bool()
    divergences = per_position(DIVERGENCES[divergence], student_logits, targets)
    divergences = torch.where(masked, divergences, torch.zeros_like(divergences))
    return divergences.sum() / masked.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# Rounds


@dataclass(frozen=True)
class SDTTRound:
    round: int  # 0-based
    dt_multiplier: int  # 2**round: how many first-round teacher steps one step of this round's teacher covers
    dt: float  # fraction of the canvas one teacher step unmasks
    teacher_steps: int  # steps of this round's teacher over the canvas (the effective steps being distilled)
    student_steps: int  # steps the student learns to take: half the teacher's


def sdtt_round(step: int, steps_per_round: int, teacher_steps: int = 1024, rounds: int = 7) -> SDTTRound:
    """The SDTT round after `step` optimizer steps: round `min(step // steps_per_round, rounds - 1)`, in which the
    teacher takes `teacher_steps / 2**round` steps (1024 -> 512 -> ...) and dt doubles each round."""
    current = min(step // steps_per_round, rounds - 1)
    multiplier = 2**current
    steps = teacher_steps // multiplier
    return SDTTRound(
        round=current,
        dt_multiplier=multiplier,
        dt=multiplier / teacher_steps,
        teacher_steps=steps,
        student_steps=steps // TEACHER_STEPS,
    )


def round_of(config: TargetsConfig, step: int) -> SDTTRound:
    """The round of the recipe's SDTT schedule after `step` optimizer steps."""
    return sdtt_round(step, config.steps_per_round, config.teacher_steps, config.rounds)


def saved_round_dir(rounds_dir: Path, index: int) -> Path:
    """Where round `index`'s starting teacher is saved (`round-XX`; round 0's teacher is the initial one)."""
    return Path(rounds_dir) / f"round-{index:02d}"


class TeacherRounds:
    """Keeps the frozen teacher in the round of the current optimizer step (see the resume contract above).

    `teacher` is frozen here (no gradients, eval mode). `rounds_dir` holds each round's saved teacher; `rank` 0
    writes it (every rank copies its own student replica, identical under ZeRO stages 0-2; ZeRO-3 partitions the
    student, which this copy does not gather, so it is refused).
    """

    def __init__(self, teacher: Teacher, config: TargetsConfig, rounds_dir: Path, rank: int = 0):
        self.teacher = teacher
        self.config = config
        self.rounds_dir = Path(rounds_dir)
        self.rank = rank
        self.round: int | None = None
        teacher.model.requires_grad_(False).eval()

    def schedule(self, step: int) -> SDTTRound:
        return round_of(self.config, step)

    def round_dir(self, index: int) -> Path:
        return saved_round_dir(self.rounds_dir, index)

    def update(self, step: int, student: torch.nn.Module) -> SDTTRound:
        """The round of `step`; on entering a new round the teacher becomes that round's teacher."""
        current = self.schedule(step)
        if current.round == self.round:
            return current
        first_step = current.round * self.config.steps_per_round
        saved = self.round_dir(current.round)
        if current.round == 0:
            pass  # the initial teacher
        elif (saved / "round.json").is_file():
            loaded = type(self.teacher.model).from_pretrained(saved)
            self.teacher.model.load_state_dict(loaded.state_dict())
        elif step == first_step:
            self._take_student(student)
            if self.rank == 0:
                save_teacher(self.teacher, saved)
                record = {"first_step": first_step, **asdict(current)}
                write_json(saved / "round.json", record)
        else:
            raise FileNotFoundError(
                f"sdtt: resuming at step {step} in round {current.round}, but that round's teacher ({saved}) was "
                f"not saved; it cannot be rebuilt from a student trained past step {first_step}"
            )
        self.teacher.model.requires_grad_(False).eval()
        self.round = current.round
        return current

    def _take_student(self, student: torch.nn.Module) -> None:
        module = getattr(student, "module", student)  # a DeepSpeed engine wraps the model
        if any(hasattr(parameter, "ds_id") for parameter in module.parameters()):
            raise ValueError("sdtt: copying the student into the teacher needs full replicas (ZeRO stage 0-2)")
        self.teacher.model.load_state_dict(module.state_dict())


def sdtt_loss_fn(
    student: Teacher, rounds: TeacherRounds, eps: float = 1e-3
) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """A trainer `LossFn` for SDTT: mask the batch's response (t ~ U[eps, 1]), teacher targets with the round's dt,
    one student forward, `sdtt_loss`. The batch carries `input_ids`, `attention_mask`, `response_mask` `[B, T]`
    and the optimizer `step` (int)."""
    config = rounds.config

    def loss_fn(model, batch, generator):
        current = rounds.update(int(batch["step"]), model)
        noisy, masked, _ = mask_tokens(
            batch["input_ids"], batch["response_mask"], student.mask_token_id, eps, generator
        )
        # Teacher and student score the columns from the first response position on (right-padded rows).
        start = loss_start(batch["response_mask"])
        targets = sdtt_targets(
            rounds.teacher,
            noisy,
            batch["attention_mask"],
            batch["response_mask"],
            current.dt,
            generator,
            config.temperature,
            vision_of(batch),
            start,
        )
        logits = student.with_model(model).forward(noisy, batch["attention_mask"], start=start, **vision_of(batch))
        loss = sdtt_loss(logits, targets.log_probs, masked[:, start:], config.divergence)
        metrics = {"sdtt_round": current.round, "sdtt_dt": current.dt, "sdtt_teacher_steps": current.teacher_steps}
        return loss, metrics

    return loss_fn
