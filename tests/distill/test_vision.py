"""Image prompts through fewstep's stages on a tiny Dimple: the prompt's vision block, batched decoding equal to
per-sample decoding, the vision tower run once per decode, and training batches that carry the images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from distill.d3llm import Curriculum, TrajectoryBatches
from distill.data import SequencePool, encode_records
from distill.decoding import decode
from distill.recipe import DecoderConfig, StudentConfig
from distill.sdtt import sdtt_targets
from students.build import build_student
from teachers.vision import IMAGE_PAD, VISION_END, VISION_START, image_sha256
from tests.builders import tiny_teacher

GEN_LENGTH = 16


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 256, backbone="dimple")
    with torch.no_grad():  # peaked, varied distributions: thresholds commit several tokens, rows finish apart
        teacher.model.lm_head.weight.mul_(40)
    return teacher


def picture(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


# Rows of different prompt lengths and image sizes (4 and 6 merged tokens, two images in one row, a text row).
ROWS = [
    ("what is it?", [picture(56, 56, 1)]),
    ("and this one, longer?", [picture(84, 56, 2)]),
    ("text only", []),
    ("two of them", [picture(56, 56, 3), picture(56, 84, 4)]),
]


def test_prompt_holds_one_vision_block_per_image_with_its_merged_patch_count(teacher):
    prompt = teacher.encode_prompt("two of them", ROWS[3][1])
    tokens = teacher.tokenizer.convert_ids_to_tokens(prompt.ids)
    assert tokens.count(VISION_START) == tokens.count(VISION_END) == 2
    assert tokens.count(IMAGE_PAD) == 4 + 6
    assert prompt.vision.image_grid_thw.tolist() == [[1, 4, 4], [1, 6, 4]]
    assert prompt.vision.pixel_values.shape == (16 + 24, 3 * 2 * 14 * 14)
    # The block sits before the question, as Qwen2-VL's chat template places an image.
    assert tokens.index(VISION_START) < tokens.index("t")
    assert teacher.encode_prompt("text only").vision is None


def test_hand_written_image_tokens_and_images_for_a_text_teacher_are_refused(teacher):
    with pytest.raises(ValueError, match="image tokens are placed"):
        teacher.encode_prompt(f"look {IMAGE_PAD} here")
    dream = tiny_teacher(32, 64, 1, 2, 1, 64, backbone="dream")
    with pytest.raises(ValueError, match="takes no images"):
        dream.encode_prompt("what is it?", [picture(56, 56, 1)])


@contextmanager
def count_vision_calls(teacher) -> Iterator[list[int]]:
    """Counts the vision tower's forwards inside the block (the hook leaves with it: the teacher is shared)."""
    calls = [0]
    handle = teacher.model.visual.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "decoder",
    [
        DecoderConfig(name="low_confidence", block_length=8),
        DecoderConfig(name="confident", threshold=0.5, block_length=8, cache="prompt"),
        DecoderConfig(name="threshold", threshold=0.5, block_length=8, cache="blocks"),
        DecoderConfig(name="multi_block", threshold=0.5, block_length=4, cache="none"),
    ],
    ids=lambda decoder: decoder.name,
)
def test_left_padded_batch_of_image_prompts_equals_per_sample_decoding(teacher, decoder):
    prompts = [teacher.encode_prompt(question, images) for question, images in ROWS]
    batched = decode(teacher, [p.ids for p in prompts], decoder, GEN_LENGTH, vision=[p.vision for p in prompts])
    for row, prompt in enumerate(prompts):
        alone = decode(teacher, [prompt.ids], decoder, GEN_LENGTH, vision=[prompt.vision])
        assert torch.equal(batched.tokens[row], alone.tokens[0]), row
        assert torch.equal(batched.order[row], alone.order[0]), row
        assert batched.nfe[row] == alone.nfe[0]
    # Rows finish at different steps (the batch shrinks): the comparison above covers row selection.
    assert len(set(batched.nfe.tolist())) > 1 or decoder.name == "low_confidence"


def test_vision_tower_runs_once_per_decode_not_once_per_forward(teacher):
    prompts = [teacher.encode_prompt(question, images) for question, images in ROWS]
    decoder = DecoderConfig(name="low_confidence", cache="none")  # one token per forward: GEN_LENGTH forwards
    with count_vision_calls(teacher) as calls:
        result = decode(teacher, [p.ids for p in prompts], decoder, GEN_LENGTH, vision=[p.vision for p in prompts])
    assert int(result.nfe.max()) > 1
    assert calls[0] == 1


def test_the_image_reaches_the_decoded_logits(teacher):
    prompt = teacher.encode_prompt("what is it?", [picture(56, 56, 1)])
    other = teacher.encode_prompt("what is it?", [picture(56, 56, 9)])
    canvas = torch.tensor([prompt.ids + [teacher.mask_token_id] * 8])
    inputs = {"pixel_values": prompt.vision.pixel_values, "image_grid_thw": prompt.vision.image_grid_thw}
    seen = teacher.forward(canvas, start=len(prompt.ids), **inputs)
    inputs["pixel_values"] = other.vision.pixel_values
    assert (seen - teacher.forward(canvas, start=len(prompt.ids), **inputs)).abs().max() > 1e-4


def records():
    return [
        {"id": f"r{i}", "task": "t", "prompt": question, "response": "7", "answer": "7", "images": images}
        for i, (question, images) in enumerate(ROWS)
    ]


def test_training_batches_carry_each_rows_images_in_row_order(teacher):
    examples = encode_records(teacher, records(), 8)
    pool = SequencePool(examples, 6, 8, teacher.pad_token_id, seed=0, vision_fn=teacher.vision_inputs)
    batch = pool.batch(3)
    image_tokens = (batch["input_ids"] == teacher.model.config.image_token_id).sum()
    assert batch["image_grid_thw"].prod(-1).sum() // 4 == image_tokens > 0
    logits = teacher.forward(
        batch["input_ids"],
        batch["attention_mask"],
        **{"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]},
    )
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="no vision_fn"):
        SequencePool(examples, 6, 8, teacher.pad_token_id, seed=0)


def test_trajectory_batches_carry_the_images_of_their_records(teacher):
    rows = []
    for record, example in zip(records(), encode_records(teacher, records(), 8), strict=True):
        rows.append(
            {
                "sample_id": record["id"],
                "prompt_ids": example.prompt,
                "image_sha256": [image_sha256(image) for image in record["images"]],
                "target_ids": example.response + [teacher.pad_token_id] * (8 - len(example.response)),
                "order": list(range(8)),
                "images": record["images"],
            }
        )
    curriculum = Curriculum(floor_start=0.0, floor_end=0.5, t_max=0.8, windows=(8,))
    batches = TrajectoryBatches(
        rows, 5, 10, curriculum, teacher.mask_token_id, teacher.pad_token_id, seed=0, vision_fn=teacher.vision_inputs
    )
    batch = batches.batch(0)
    image_tokens = (batch["input_ids"] == teacher.model.config.image_token_id).sum()
    assert batch["image_grid_thw"].prod(-1).sum() // 4 == image_tokens > 0


def test_a_fresh_dimples_image_features_start_at_the_scale_of_its_token_embeddings():
    # At initializer_range on both projector layers they came out ~30x smaller and a model trained from scratch
    # never learned to read its images.
    torch.manual_seed(0)
    teacher = tiny_teacher(128, 384, 1, 4, 2, 256, backbone="dimple")
    prompt = teacher.encode_prompt("what is it?", [picture(84, 56, 5)])
    with torch.no_grad():
        features = teacher.model.get_image_features(prompt.vision.pixel_values, prompt.vision.image_grid_thw)
    embeddings = teacher.model.model.embed_tokens.weight
    assert 0.2 < features.std() / embeddings.std() < 20


@pytest.mark.parametrize(
    ("train_vision", "tower", "projector"), [("all", True, True), ("projector", False, True), ("none", False, False)]
)
def test_train_vision_freezes_the_vision_parts_it_names(teacher, train_vision, tower, projector):
    student = build_student(teacher, StudentConfig(kind="full", train_vision=train_vision))
    assert all(p.requires_grad == tower for p in student.visual.parameters())
    assert all(p.requires_grad == projector for p in student.img_projector.parameters())
    assert all(p.requires_grad for p in student.model.parameters())


def test_sdtt_targets_see_the_rows_images_through_one_vision_encoding(teacher):
    examples = encode_records(teacher, records(), 8)
    batch = SequencePool(examples, 4, 8, teacher.pad_token_id, seed=0, vision_fn=teacher.vision_inputs).batch(1)
    masked = batch["response_mask"].bool()
    x_t = batch["input_ids"].masked_fill(masked, teacher.mask_token_id)
    vision = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    args = (teacher, x_t, batch["attention_mask"], batch["response_mask"], 2, None, 0.0)
    with count_vision_calls(teacher) as calls:
        seen = sdtt_targets(*args, vision)
    assert calls[0] == 1  # both teacher steps reuse the features
    vision["pixel_values"] = torch.zeros_like(vision["pixel_values"])
    blank = sdtt_targets(*args, vision)
    assert (seen.log_probs - blank.log_probs)[masked].abs().max() > 1e-4
