"""`distill bench decode`: every cache mode and decoding path timed on the same prompts beside cached AR decoding,
medians, ms per forward against the weight-read floor, ratios and output agreement."""

import json
import statistics

import pytest
import torch
import yaml

from distill.cli import main
from distill.decoding import decode
from distill.recipe import DecoderConfig
from eval.bench import autoregressive_decode, bench_decoders, copy_bandwidth, weight_read_floor
from teachers.interface import save_teacher
from tests.builders import tiny_teacher

RECORDS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(12, 34), (7, 8), (250, 9)]]


def causal_tiny():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    teacher.model.config.causal = True
    return teacher


def test_every_cache_mode_is_timed_and_compared_with_no_cache():
    settings = [("lc", DecoderConfig(block_length=4), 8), ("one-block", DecoderConfig(name="confident"), 8)]
    results = bench_decoders(causal_tiny(), RECORDS, settings, batch_size=2, repeats=5)
    assert [(r["decoder"], r["cache"]) for r in results] == [
        ("lc", "none"),
        ("lc", "prompt"),
        ("lc", "blocks"),
        ("one-block", "none"),  # a single block: the block cache would be the prompt cache
        ("one-block", "prompt"),
    ]
    medians = {(r["decoder"], r["cache"]): r["median_s"] for r in results}
    for result in results:
        assert len(result["runs_s"]) == 5 and result["median_s"] == statistics.median(result["runs_s"])
        assert result["speedup"] == pytest.approx(medians[result["decoder"], "none"] / result["median_s"])
        assert result["same_output_fraction"] == 1.0  # a causal model: the cache is exact
        assert result["nfe"] > 0 and 0 <= result["accuracy"] <= 100 and result["settings"]["cache"] == result["cache"]


def test_bench_command_writes_json_and_wants_five_runs(tmp_path, capsys):
    teacher = causal_tiny()
    save_teacher(teacher, tmp_path / "teacher")
    tree = {
        "run": {"name": "b", "output_dir": str(tmp_path / "run")},
        "teacher": {"pretrain": {}},
        "data": {"max_response_tokens": 8, "tasks": [{"name": "addition", "train_size": 10, "eval_size": 4}]},
        "eval": {"batch_size": 2, "decoder": {"name": "threshold", "block_length": 4, "sweep": [0.5, 0.9]}},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    args = ["bench", "decode", str(recipe), "--checkpoint", str(tmp_path / "teacher"), "--samples", "3"]
    assert main(args) == 0
    payload = json.loads((tmp_path / "run" / "bench" / "decode.json").read_text())
    assert payload["samples"] == 3 and payload["repeats"] == 5 and payload["batch_sizes"] == [2] and payload["causal"]
    assert set(payload) >= {"hardware", "threads", "versions", "prompt_tokens_mean", "results", "floor_ms"}
    # On CPU the default paths are eager and static; no ar-baseline in the run directory: no AR rows.
    assert [(r["cache"], r["path"]) for r in payload["results"]] == [
        (cache, path) for cache in ("none", "prompt", "blocks") for path in ("eager", "static")
    ]
    assert all(r["settings"]["threshold"] == 0.5 for r in payload["results"])  # the first sweep value
    assert all(r["same_as_eager"] == 1.0 and r["floor_ratio"] > 0 for r in payload["results"])
    assert "[bench]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        main([*args, "--repeats", "4"])
    assert caught.value.code == 2 and "at least 5" in capsys.readouterr().err
    assert main(["bench", "decode", str(recipe), "--checkpoint", str(tmp_path / "none")]) == 1


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_cached_autoregressive_decoding_equals_the_engines_left_to_right_decoder(backbone):
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 2, 2, 1, 64, backbone=backbone)
    torch.nn.init.normal_(teacher.model.get_output_embeddings().weight, std=0.5)
    teacher.model.config.causal = True
    prompts = [teacher.encode_prompt(record["prompt"]) for record in RECORDS]
    engine = decode(teacher, [p.ids for p in prompts], DecoderConfig(steps=12, block_length=1), 12)
    tokens, forwards = autoregressive_decode(teacher, prompts, 12)
    assert [teacher.decode_response(row.tolist()) for row in tokens] == [
        teacher.decode_response(row.tolist()) for row in engine.tokens
    ]
    # One forward per token (plus the prompt's mask for an unshifted backbone), not one per prefix re-encoding.
    assert forwards <= 12 + (backbone == "llada")


def test_paths_batch_sizes_and_the_ar_baseline_side_by_side():
    teacher = causal_tiny()
    bidirectional = tiny_teacher(32, 64, 1, 2, 1, 64)
    floor = weight_read_floor(bidirectional.model, copy_bandwidth(torch.device("cpu"), megabytes=16))
    assert floor["weight_bytes"] == 4 * sum(p.numel() for p in bidirectional.model.parameters())
    settings = [("conf", DecoderConfig(name="confident", threshold=0.5, block_length=4), 8)]
    results = bench_decoders(
        bidirectional, RECORDS, settings, [1, 3], 5, ("eager", "static"), ar_teacher=teacher, floor_ms=floor["floor_ms"]
    )
    keys = [(r["batch_size"], r["decoder"], r["cache"], r["path"]) for r in results]
    expected = [(1, "conf", c, p) for c in ("none", "prompt", "blocks") for p in ("eager", "static")]
    expected += [(1, "autoregressive", "autoregressive", "eager")]
    assert keys == expected + [(3, *key[1:]) for key in expected]
    for result in results:
        ar_row = result["cache"] == "autoregressive"
        assert result["same_as_eager"] == (None if ar_row else 1.0)  # the static path decodes what eager does
        assert result["forwards"] > 0 and result["ms_per_forward"] > 0
        assert result["floor_ratio"] == pytest.approx(result["ms_per_forward"] / floor["floor_ms"])
        ar = next(r for r in results if r["cache"] == "autoregressive" and r["batch_size"] == result["batch_size"])
        assert result["vs_autoregressive"] == pytest.approx(result["tokens_per_s"] / ar["tokens_per_s"])
    # At batch 1 every prompt is its own batch: prefills happen once per prompt with a prompt cache.
    cached = next(r for r in results if r["batch_size"] == 1 and r["cache"] == "prompt" and r["path"] == "eager")
    assert cached["prefills"] == len(RECORDS)
