"""The static decoding path (`static`, `compile`): token for token what the eager path decodes, for every decoder and
cache mode, on text and image prompts, with fixed shapes and one set of cache buffers per decode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.decoding import decode
from distill.recipe import DecoderConfig
from teachers.backbones.diffusion_generation import StaticKV
from tests.builders import tiny_teacher
from tests.distill.test_vision import ROWS

GEN_LENGTH = 16
PROMPTS = ["12+34=", "7+8=", "sort 3 1 2", "1"]
DECODERS = [
    dict(name="low_confidence", steps=8, block_length=4),
    dict(name="confident", threshold=0.3, block_length=4),
    dict(name="threshold", threshold=0.3, block_length=4),
    dict(name="multi_block", threshold=2.0, block_length=4),
]
CACHES = [
    dict(cache="none"),
    dict(cache="prompt"),
    dict(cache="blocks", cache_delay=0),
    dict(cache="blocks", cache_delay=1, refresh_every=3),
]


def sharp(backbone: str):
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 2, 2, 1, 64, backbone=backbone)
    # A sharper head than the random init's: thresholds commit several tokens and rows finish at different steps.
    nn.init.normal_(teacher.model.get_output_embeddings().weight, std=0.5)
    return teacher


def assert_same(eager, static) -> None:
    for field in ("tokens", "order", "nfe", "generated"):
        assert torch.equal(getattr(eager, field), getattr(static, field)), field


@pytest.mark.parametrize("backbone", ["llada", "dream"])
@pytest.mark.parametrize("decoder", DECODERS, ids=[d["name"] for d in DECODERS])
def test_static_path_decodes_exactly_as_the_eager_path(backbone, decoder):
    teacher = sharp(backbone)
    prompts = [teacher.encode_prompt(text).ids for text in PROMPTS]
    finishing_apart = False
    for cache in CACHES:
        config = DecoderConfig(**decoder, **cache)
        eager = decode(teacher, prompts, config, GEN_LENGTH)
        assert_same(eager, decode(teacher, prompts, config.model_copy(update={"static": True}), GEN_LENGTH))
        finishing_apart |= len(set(eager.nfe.tolist())) > 1
    # Rows leave the eager batch at different steps somewhere above, so row selection is covered.
    assert finishing_apart or decoder["name"] in ("low_confidence", "confident", "threshold")


def test_static_path_samples_the_same_tokens():
    # Sampling draws from the generator per decoding row: the static path must hand the decoder the same rows.
    teacher = sharp("dream")
    prompts = [teacher.encode_prompt(text).ids for text in PROMPTS]
    for config in (
        DecoderConfig(name="low_confidence", steps=8, block_length=4, remasking="random", cache="prompt"),
        DecoderConfig(name="multi_block", threshold=2.0, block_length=4, temperature=0.8, top_k=5, cache="blocks"),
    ):
        eager = decode(teacher, prompts, config, GEN_LENGTH, torch.Generator().manual_seed(3))
        static = config.model_copy(update={"static": True})
        assert_same(eager, decode(teacher, prompts, static, GEN_LENGTH, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("decoder", DECODERS, ids=[d["name"] for d in DECODERS])
def test_static_path_on_image_prompts(decoder):
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 256, backbone="dimple")
    with torch.no_grad():
        teacher.model.lm_head.weight.mul_(40)
    prompts = [teacher.encode_prompt(question, images) for question, images in ROWS]
    ids, vision = [p.ids for p in prompts], [p.vision for p in prompts]
    for cache in ("none", "prompt", "blocks"):
        config = DecoderConfig(**decoder, cache=cache)
        eager = decode(teacher, ids, config, GEN_LENGTH, vision=vision)
        static = decode(teacher, ids, config.model_copy(update={"static": True}), GEN_LENGTH, vision=vision)
        assert_same(eager, static)


def test_static_forwards_keep_the_batch_and_the_cache_buffers_fixed():
    teacher = sharp("dream")
    prompts = [teacher.encode_prompt(text).ids for text in PROMPTS]
    calls: list[tuple[tuple[int, ...], int | None]] = []
    model_forward = teacher.model.forward

    def recording(*args, **kwargs):
        cache = kwargs.get("cache")
        pointer = cache.keys[0].data_ptr() if isinstance(cache, StaticKV) else None
        calls.append((tuple(kwargs["input_ids"].shape), pointer, kwargs.get("use_cache", False)))
        return model_forward(*args, **kwargs)

    teacher.model.forward = recording
    config = DecoderConfig(name="multi_block", threshold=2.0, block_length=4, cache="blocks", cache_delay=0)
    eager = decode(teacher, prompts, config, GEN_LENGTH)
    assert len(set(eager.nfe.tolist())) > 1  # rows finish apart: the eager batch shrinks
    calls.clear()
    decode(teacher, prompts, config.model_copy(update={"static": True}), GEN_LENGTH)
    steps = [(shape, pointer) for shape, pointer, prefill in calls if not prefill]
    assert all(shape[0] == len(PROMPTS) for shape, _ in steps)  # every forward runs the whole batch
    cached = [(shape, pointer) for shape, pointer in steps if pointer is not None]
    assert cached and len({pointer for _, pointer in cached}) == 1  # one set of buffers for the whole decode
    # One shape per cached prefix length (a block), whatever the number of rows still decoding.
    assert len({shape for shape, _ in cached}) <= GEN_LENGTH // 4


def test_compiled_decoding_equals_eager_and_reuses_its_compilation():
    torch._dynamo.reset()
    teacher = sharp("dream")
    prompts = [teacher.encode_prompt(text).ids for text in PROMPTS]
    config = DecoderConfig(name="confident", threshold=0.3, block_length=4, cache="prompt")
    eager = decode(teacher, prompts, config, GEN_LENGTH)
    compiled = config.model_copy(update={"compile": True})
    assert_same(eager, decode(teacher, prompts, compiled, GEN_LENGTH))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert_same(eager, decode(teacher, prompts, compiled, GEN_LENGTH))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # nothing compiled the second time
