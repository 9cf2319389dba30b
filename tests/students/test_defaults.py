"""The decoding defaults an export recommends: the student's best report point, else the recipe's eval decoder."""

from distill.recipe import validate_tree
from eval.report import new_report
from students.defaults import generation_settings, recommended_decoder
from tests.builders import tiny_teacher

RECIPE = {
    "run": {"name": "t"},
    "teacher": {"pretrain": {}},
    "data": {"tasks": [{"name": "addition"}, {"name": "sorting"}], "max_response_tokens": 24},
    "eval": {
        "rows": ["teacher", "student"],
        "decoder": {"name": "confident", "sweep": [0.5, 0.9, 0.99], "pins": {-8: "#### "}},
        "decoders": [{"name": "multi_block", "block_length": 8, "sweep": [0.1, 0.5, 2.0]}],
    },
}


def row(name, decoder, knob_name, points, settings):
    return {
        "name": name,
        "decoder": decoder,
        "decoder_name": decoder,
        "knob_name": knob_name,
        "settings": settings,
        "run": "t",
        "hardware": "cpu",
        "batch_size": 4,
        "points": [
            {
                "knob": knob,
                "tpf": tpf,
                "accuracy": accuracy,
                "nfe": 1.0,
                "tokens_per_s": 1.0,
                "samples": 4,
                "seconds": 1,
            }
            for knob, tpf, accuracy in points
        ],
    }


def report(recipe):
    confident = recipe.eval.decoder.model_dump(mode="json", exclude={"label", "sweep", "threshold"})
    multi_block = recipe.eval.decoders[0].model_dump(mode="json", exclude={"label", "sweep", "threshold"})
    rows = {
        # confident: 0.5 and 0.9 equally fast and accurate (tie -> 0.9), 0.99 slower.
        task: [
            row(
                "student", "confident", "threshold", [(0.5, 8.0, 90.0), (0.9, 8.0, 90.0), (0.99, 4.0, 90.5)], confident
            ),
            row(
                "student",
                "multi_block",
                "threshold",
                [(0.1, 2.0, 90.0), (0.5, 3.0, 80.0), (2.0, 6.0, 40.0)],
                multi_block,
            ),
            row("teacher", "confident", "threshold", [(0.5, 20.0, 95.0)], confident),
        ]
        for task in ("addition", "sorting")
    }
    return new_report(rows, run="t", alpha=3.0, batch_size=4, recipe_hash="x")


def test_the_students_best_decoder_at_its_fastest_near_best_point():
    recipe = validate_tree(RECIPE)
    decoder, source = recommended_decoder(recipe, report(recipe))
    # The teacher row scores higher but is not the student; confident beats multi_block on AUP.
    assert decoder.name == "confident" and decoder.threshold == 0.9
    # The KV-cache mode it was scored with travels too: the export decodes with fewstep's own decoding module.
    assert decoder.gen_length == 24 and decoder.cache == "prompt" and decoder.pins == {-8: "#### "}
    assert "student · confident at threshold=0.9" in source


def test_without_student_rows_the_recipes_eval_decoder():
    recipe = validate_tree(RECIPE)
    decoder, source = recommended_decoder(recipe, None)
    assert (decoder.name, decoder.threshold, decoder.gen_length, decoder.cache) == ("confident", 0.9, 24, "prompt")
    assert "recipe's eval decoder" in source


def test_generation_settings_hold_pins_as_token_ids():
    recipe = validate_tree(RECIPE)
    decoder, _ = recommended_decoder(recipe, None)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    settings = generation_settings(decoder, teacher)
    assert settings["decoder"] == "confident" and settings["gen_length"] == 24 and settings["threshold"] == 0.9
    assert settings["pin_ids"] == {"-8": teacher.tokenizer.encode("#### ", add_special_tokens=False)}
