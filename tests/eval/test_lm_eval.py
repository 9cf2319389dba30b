"""Standard benchmarks through lm-evaluation-harness (the real, pinned harness; everything offline).

A tiny Dream teacher is overfitted in a few seconds on 10 of 16 `addition` eval records, each with two responses
(its own and the next record's), so it answers some of them and misses the rest, and what it answers depends on
how many tokens it commits per forward (committed together, the two answers' digits mix). The 16 records become
a local lm-eval task (`dataset_path: json` over a JSONL file, scored by fewstep's own `is_correct`) and a fewstep
data file: `distill lm-eval` must give `distill eval`'s accuracy, TPF, NFE and outputs at every knob value of the
same decoder; a multiple-choice task runs through `loglikelihood`; the masked-diffusion ELBO is checked against
its exact value; `distill run` ends with the harness when the recipe has `eval.lm_eval`.
"""

import itertools
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import main
from distill.losses import mask_tokens, masked_diffusion_loss
from distill.recipe import AdditionTask, DecoderConfig, RecipeError, load_recipe
from eval.aup import aup_score
from eval.lm_eval import FewstepLM, causal_loglikelihood, masked_elbo, model_settings, request_generator
from eval.tasks import generate
from teachers.interface import save_teacher
from tests.builders import tiny_teacher

CANVAS = 16  # response tokens: `C:010 #### 082` and its end token fit
TASK = "fewstep_add"
MC_TASK = "fewstep_add_mc"
SWEEP = [1.0, 0.9, 0.5, 0.0]  # confident decoding's γ, from one token per forward to everything at once
ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def overfit_teacher(records: list[dict], steps: int):
    """A tiny Dream LM trained by masked diffusion on `records` only (plain AdamW, no DeepSpeed: ~5 s)."""
    torch.manual_seed(0)
    teacher = tiny_teacher(64, 128, 2, 4, 2, 64)
    prompts = [teacher.encode_prompt(record["prompt"]).ids for record in records]
    width = max(len(prompt) for prompt in prompts) + CANVAS
    rows, attention, response = [], [], []
    for prompt, record in zip(prompts, records, strict=True):
        answer = teacher.encode_response(record["response"])
        sequence = prompt + answer + [teacher.eos_token_id] * (CANVAS - len(answer))
        pad = width - len(sequence)
        rows.append([teacher.pad_token_id] * pad + sequence)
        attention.append([0] * pad + [1] * len(sequence))
        response.append([0] * (pad + len(prompt)) + [1] * CANVAS)
    ids, attention, response = torch.tensor(rows), torch.tensor(attention), torch.tensor(response)
    optimizer = torch.optim.AdamW(teacher.model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    teacher.model.train()
    for _ in range(steps):
        noisy, masked, t = mask_tokens(ids, response, teacher.mask_token_id, 0.05, generator)
        loss = masked_diffusion_loss(teacher.forward(noisy, attention), ids, masked, t, response, "uniform")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.model.eval()
    return teacher


GENERATE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response}}}}"
generation_kwargs:
  until: ["\\n\\n"]
process_results: !function scoring.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
# The right response against another record's (one the model never saw after this prompt).
MULTIPLE_CHOICE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{[response, other]}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""
# fewstep's exact-match scoring, so the harness's accuracy is `distill eval`'s on the same outputs.
SCORING = """from eval.tasks import is_correct


def process_results(doc, results):
    return {"acc": float(is_correct(results[0], doc["answer"], doc["task"]))}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The overfitted teacher's folder, the records as a JSONL file, the local task folder and a recipe."""
    root = tmp_path_factory.mktemp("lm_eval")
    config = AdditionTask(name="addition", train_size=0, eval_size=16, min_digits=1, max_digits=2)
    records = generate(config, "eval", 0)
    twice = [
        {"prompt": r["prompt"], "response": records[index + 1]["response"]} for index, r in enumerate(records[:10])
    ]
    teacher = overfit_teacher(records[:10] + twice, steps=600)
    save_teacher(teacher, root / "teacher")

    data = root / "records.jsonl"
    rows = [
        {"prompt": r["prompt"], "response": r["response"], "answer": r["answer"], "task": TASK}
        | {"other": records[(index + 5) % len(records)]["response"]}
        for index, r in enumerate(records)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(GENERATE_YAML.format(task=TASK, data=data))
    (tasks / f"{MC_TASK}.yaml").write_text(MULTIPLE_CHOICE_YAML.format(task=MC_TASK, data=data))
    (tasks / "scoring.py").write_text(SCORING)

    recipe = {
        "run": {"name": "lm-eval-test", "seed": 0, "stages": ["eval"], "output_dir": str(root / "run")},
        "teacher": {"name": "dream", "path": str(root / "teacher")},
        "data": {"max_response_tokens": CANVAS, "files": [{"name": TASK, "eval_path": str(data)}]},
        "eval": {
            "rows": ["teacher"],
            "batch_size": 4,
            "decoder": {"name": "confident", "cache": "none", "sweep": SWEEP},
        },
        "logging": {"progress": False},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": root, "teacher": root / "teacher", "records": records, "tasks": tasks, "recipe": recipe}


def lm_eval_args(setup: dict, out: Path, *extra: str, model: str = "") -> list[str]:
    model_args = f"pretrained={setup['teacher']},decoder=confident,cache=none,gen_length={CANVAS},batch_size=4"
    return ["lm-eval", "--model-args", model_args + model, "--tasks", TASK, "--include-path", str(setup["tasks"])] + [
        "--out",
        str(out),
        *extra,
    ]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_sweep_gives_distill_evals_accuracy_tpf_and_outputs(setup, tmp_path, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    began = time.perf_counter()
    recipe = setup["root"] / "recipe.yaml"
    assert main(["eval", str(recipe), f"run.output_dir={tmp_path / 'eval'}"]) == 0
    eval_seconds = time.perf_counter() - began
    expected = json.loads((tmp_path / "eval" / "eval" / "report.json").read_text())
    (expected_row,) = expected["tasks"][0]["rows"]

    began = time.perf_counter()
    sweep = ",".join(str(value) for value in SWEEP)
    assert main(lm_eval_args(setup, tmp_path / "lm", "--sweep", sweep)) == 0
    lm_eval_seconds = time.perf_counter() - began
    report = json.loads((tmp_path / "lm" / "report.json").read_text())
    (entry,) = report["tasks"]
    (row,) = entry["rows"]
    assert entry["task"] == TASK and row["name"] == "teacher" and row["decoder"] == "confident"

    measured = [(p["knob"], p["accuracy"], p["tpf"], p["nfe"], p["samples"]) for p in row["points"]]
    reference = [(p["knob"], p["accuracy"], p["tpf"], p["nfe"], p["samples"]) for p in expected_row["points"]]
    print(f"distill eval {eval_seconds:.1f} s, distill lm-eval {lm_eval_seconds:.1f} s")
    print("knob, accuracy %, TPF, NFE, samples:", measured)
    assert measured == reference
    # A real number to match: the teacher answers some records, not all, and commits more per forward as γ falls.
    assert 0.0 < measured[0][1] < 100.0 and measured[-1][2] > 2 * measured[0][2]
    # The same outputs document by document, at every knob value (the harness's prompt is the chat template's).
    ours = [
        (line["knob"], line["output"], line["correct"]) for line in jsonl(tmp_path / "lm" / "teacher" / f"{TASK}.jsonl")
    ]
    theirs = [
        (line["knob"], line["output"], float(line["correct"]))
        for line in jsonl(tmp_path / "eval" / "eval" / "teacher" / f"{TASK}.jsonl")
    ]
    assert ours == theirs

    # The report's AUP recomputes from its own points, against its y_max; its rows carry the sweep fields.
    points = [(point["tpf"], point["accuracy"]) for point in row["points"]]
    assert entry["y_max"] == max(accuracy for _, accuracy in points)
    assert row["aup"] == pytest.approx(aup_score(points, entry["y_max"], entry["alpha"]), rel=1e-12)
    assert row["aup"] == pytest.approx(expected_row["aup"], rel=1e-12)
    assert row["sweep"] == "pinned" and row["one_token_knob"] == 1.0
    for name in ("report.md", "report.html", f"report-{TASK}.png"):
        assert (tmp_path / "lm" / name).is_file()

    # One harness run at the decoder's settings: the harness's own results, with NFE and TPF beside them.
    assert main(lm_eval_args(setup, tmp_path / "once", model=",threshold=0.5")) == 0
    once = json.loads((tmp_path / "once" / "results.json").read_text())
    at_half = next(p for p in expected_row["points"] if p["knob"] == 0.5)
    assert once["fewstep"][TASK]["accuracy"] == at_half["accuracy"]
    assert once["fewstep"][TASK]["tpf"] == at_half["tpf"]
    assert once["harness"]["results"][TASK]["acc,none"] == at_half["accuracy"] / 100


def test_an_auto_sweep_stops_past_the_cutoff_and_reports_its_curve(setup, tmp_path, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    # Fixed-step decoding in one 16-token block: 16, 8, 6, 4, 3, 2, 1 steps.
    args = lm_eval_args(setup, tmp_path / "auto", "--sweep", model=",decoder=low_confidence")
    assert main(args) == 0
    (entry,) = json.loads((tmp_path / "auto" / "report.json").read_text())["tasks"]
    (row,) = entry["rows"]
    knobs = [point["knob"] for point in row["points"]]
    assert knobs[0] == CANVAS and row["sweep"] == "auto" and row["decoder"] == "low_confidence"
    assert knobs == [16, 8, 6, 4, 3, 2, 1][: len(knobs)]
    points = [(point["tpf"], point["accuracy"]) for point in row["points"]]
    # Complete: it fell past the cut-off (and stopped there) or it reached one step.
    fell = [accuracy < points[0][1] - 5 for _, accuracy in points]
    assert (fell[-1] and not any(fell[:-1])) or knobs[-1] == 1
    assert row["cut_short"] is False
    assert row["aup"] == pytest.approx(aup_score(points, entry["y_max"], entry["alpha"]), rel=1e-12)


def test_multiple_choice_runs_through_the_masked_diffusion_loglikelihood(setup, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    # Registered beside the harness's own models, which stay available.
    assert get_model("fewstep") is FewstepLM and get_model("hf").__name__ == "HFLM"

    manager = TaskManager(include_path=str(setup["tasks"]), include_defaults=False)
    # Through the harness's registry, as `--model fewstep --model_args ...` would build it.
    model_args = f"pretrained={setup['teacher']},mc_num=8,batch_size=9,seed=3"
    results = simple_evaluate(
        model="fewstep", model_args=model_args, tasks=[MC_TASK], task_manager=manager, apply_chat_template=True
    )
    harness_accuracy = results["results"][MC_TASK]["acc,none"]

    # The same choice recomputed here from the ELBO of each (prompt, response) pair.
    lm = FewstepLM(pretrained=str(setup["teacher"]), mc_num=8, batch_size=9, seed=3)
    picks = []
    for sample in sorted(results["samples"][MC_TASK], key=lambda sample: sample["doc_id"]):
        scores = []
        for context, continuation in sample["arguments"]:
            ids = lm.encode_pair(context, continuation)
            generator = request_generator(3, context, continuation)
            scores.append(masked_elbo(lm.teacher, *ids, 8, 9, generator)[0])
            assert scores[-1] == pytest.approx(sample["resps"][len(scores) - 1][0][0], abs=1e-9)
        picks.append(scores.index(max(scores)) == 0)
    assert harness_accuracy == pytest.approx(sum(picks) / len(picks))
    # It prefers the right response for the records it learned it after.
    print(f"multiple choice accuracy {harness_accuracy:.3f}")
    assert sum(picks[:10]) >= 8


@torch.no_grad()
def exact_elbo(teacher, context: list[int], continuation: list[int]) -> tuple[float, float]:
    """The ELBO of LLaDA's Eq. 6 in closed form, and the variance of one draw's value: every mask set M, drawn with
    probability (1/L) / C(L, |M|), valued (L/|M|) sum_{i in M} log p(x_i | x with M masked)."""
    length, values = len(continuation), []
    ids = torch.tensor(context + continuation)
    for size in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), size))
        for subset in subsets:
            noisy = ids.clone()
            noisy[[len(context) + i for i in subset]] = teacher.mask_token_id
            log_probs = torch.log_softmax(teacher.forward(noisy[None], start=len(context))[0].double(), -1)
            value = sum(float(log_probs[i, continuation[i]]) for i in subset) * length / size
            values.append((value, 1 / length / len(subsets)))
    mean = sum(value * weight for value, weight in values)
    return mean, sum((value - mean) ** 2 * weight for value, weight in values)


def test_masked_elbo_is_exact_for_one_token_and_converges_to_its_closed_form():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    context = teacher.encode_prompt("12+34=").ids
    one = teacher.encode_response("7")[:1]
    # One token: every draw masks it, weight 1: exactly log p(x | context, [MASK]), whatever the seed.
    value, greedy = masked_elbo(teacher, context, one, 5, 2, torch.Generator().manual_seed(1))
    assert value == pytest.approx(exact_elbo(teacher, context, one)[0], abs=1e-5)

    three = teacher.encode_response("046")[:3]
    exact, variance = exact_elbo(teacher, context, three)
    draws = 600
    estimate = masked_elbo(teacher, context, three, draws, 128, torch.Generator().manual_seed(7))[0]
    standard_error = math.sqrt(variance / draws)
    print(f"ELBO exact {exact:.4f}, estimate {estimate:.4f} over {draws} draws (standard error {standard_error:.4f})")
    assert abs(estimate - exact) < 4 * standard_error and 0 < standard_error < 0.05 * abs(exact)

    # The estimate of a request depends on the seed and the request only, not on the batch it was drawn in.
    same = [masked_elbo(teacher, context, three, 16, size, request_generator(0, "a", "b"))[0] for size in (1, 5, 17)]
    assert same[0] == pytest.approx(same[1], abs=1e-5) and same[0] == pytest.approx(same[2], abs=1e-5)
    other = masked_elbo(teacher, context, three, 16, 16, request_generator(1, "a", "b"))[0]
    assert other != pytest.approx(same[0], abs=1e-5)
    # is_greedy: True exactly when the one-step argmax fill is the continuation.
    with torch.no_grad():
        filled = teacher.forward(torch.tensor([context + [teacher.mask_token_id] * 3]), start=len(context))[0]
    argmax = filled.argmax(-1).tolist()
    assert masked_elbo(teacher, context, argmax, 4, 4, torch.Generator())[1] is True
    assert masked_elbo(teacher, context, three, 4, 4, torch.Generator())[1] is (argmax == three)


def test_rolling_loglikelihood_scores_every_token_once_within_the_positions(monkeypatch):
    from lm_eval.api.instance import Instance

    import eval.lm_eval as module

    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    settings = module.ModelSettings(Path("tiny"), "tiny", DecoderConfig(gen_length=8), batch_size=8, mc_num=4)
    lm = FewstepLM.from_settings(settings, teacher)
    text = "12+34=46 and 5+7=12, 8+8=16"
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    # Short enough for one window: the ELBO of the whole text after the BOS token.
    (whole,) = lm.loglikelihood_rolling([request])
    generator = request_generator(0, text, "0")
    tokens = lm.encode(text)
    expected = masked_elbo(teacher, [teacher.tokenizer.bos_token_id], tokens, 4, 8, generator)[0]
    assert whole == pytest.approx(expected, abs=1e-9)

    # Windows of 8 positions: every token scored exactly once, each forward within 8 positions.
    monkeypatch.setattr(module, "MAX_SCORED_TOKENS", 8)
    calls = []
    real = module.masked_elbo
    monkeypatch.setattr(module, "masked_elbo", lambda t, c, x, *a: calls.append((c, x)) or real(t, c, x, *a))
    (windowed,) = lm.loglikelihood_rolling([request])
    assert sum(len(continuation) for _, continuation in calls) == len(tokens) and len(calls) > 3
    assert all(len(context) + len(continuation) <= 8 for context, continuation in calls)
    assert [token for _, continuation in calls for token in continuation] == tokens
    assert windowed < 0 and windowed != pytest.approx(whole)


def test_a_causal_checkpoint_is_scored_exactly_token_by_token():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    teacher.model.config.causal = True
    context, continuation = teacher.encode_prompt("5+7=").ids, teacher.encode_response("12")
    value, _ = causal_loglikelihood(teacher, context, continuation)
    # Each token scored by a forward that has only the tokens before it.
    expected = 0.0
    with torch.no_grad():
        for index, token in enumerate(continuation):
            prefix = torch.tensor([context + continuation[:index] + [teacher.pad_token_id]])
            logits = teacher.forward(prefix, start=prefix.shape[1] - 1, causal=True)[0, 0]
            expected += float(torch.log_softmax(logits.float(), -1)[token])
    assert value == pytest.approx(expected, abs=1e-4)


def test_model_args_take_defaults_from_an_export_or_a_run_and_refuse_bad_ones(setup, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(setup["teacher"], export)
    decoder = {"name": "multi_block", "threshold": 0.3, "block_length": 8, "gen_length": 32}
    (export / "export.json").write_text(json.dumps({"decoder": decoder}))
    settings = model_settings({"pretrained": str(export)})
    assert settings.decoder.name == "multi_block" and settings.decoder.threshold == 0.3
    assert settings.decoder.gen_length == 32 and settings.name == "export"
    # Another decoder starts from its own defaults, on the export's canvas.
    other = model_settings({"pretrained": str(export), "decoder": "threshold", "cache": None})
    assert (other.decoder.name, other.decoder.threshold, other.decoder.block_length) == ("threshold", 0.9, None)
    assert other.decoder.gen_length == 32 and other.decoder.cache == "none"

    run = tmp_path / "run"
    shutil.copytree(setup["teacher"], run / "student")
    resolved = load_recipe(setup["root"] / "recipe.yaml")
    (run / "recipe.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json")))
    settings = model_settings({"pretrained": str(run), "steps": 8, "decoder": "confident"})
    assert settings.checkpoint == run / "student" and settings.name == "student"
    assert (settings.decoder.name, settings.decoder.gen_length, settings.decoder.steps) == ("confident", CANVAS, 8)
    assert settings.batch_size == 4  # the run's eval.batch_size

    bad = {
        "decoder: 'greedy' is not a decoder": {"decoder": "greedy"},
        "unknown argument 'temprature'": {"temprature": 0.5},
        "threshold: a probability bound must lie in [0, 1]": {"decoder": "threshold", "threshold": 1.5},
        "gen_length 16 is not a multiple of block_length 5": {"block_length": 5, "gen_length": 16},
        "batch_size must be a whole number >= 1": {"batch_size": 0},
        "row: the run": {"row": "ar-baseline"},
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match="^model_args: .*" + message.replace("[", r"\[").replace("]", r"\]")):
            model_settings({"pretrained": str(run)} | args)
    with pytest.raises(ValueError, match="is not a checkpoint, an export or a run directory"):
        model_settings({"pretrained": str(tmp_path / "nowhere")})


def test_bad_arguments_exit_2_with_one_line_before_any_work(setup, tmp_path, capsys, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    cases = {
        "decoder: 'fast' is not a decoder": lm_eval_args(setup, out, model=",decoder=fast"),
        "model_args: unknown argument 'tresh'": lm_eval_args(setup, out, model=",tresh=0.5"),
        "is not a checkpoint, an export or a run directory": [
            "lm-eval",
            "--model-args",
            f"pretrained={tmp_path / 'missing'}",
            "--tasks",
            TASK,
            "--out",
            str(out),
        ],
        "tasks: 'no_such_task' is not an lm-eval task": [
            *lm_eval_args(setup, out)[:3],
            "--tasks",
            "no_such_task",
            "--include-path",
            str(setup["tasks"]),
            "--out",
            str(out),
        ],
        "--sweep: sweep value 2.0: threshold": lm_eval_args(setup, out, "--sweep", "1.0,2.0"),
        "--limit: ": lm_eval_args(setup, out, "--limit", "2.5"),
    }
    for message, args in cases.items():
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (message, err)
        assert message in err and err.startswith("distill: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_run_ends_with_the_harness_and_both_reports_agree(setup, tmp_path, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    recipe = dict(setup["recipe"]) | {"run": setup["recipe"]["run"] | {"output_dir": str(tmp_path / "run")}}
    recipe["eval"] = recipe["eval"] | {
        "decoder": {"name": "confident", "cache": "none", "sweep": [1.0, 0.0]},
        "lm_eval": {"tasks": [TASK], "include_path": str(setup["tasks"]), "limit": 8},
        "max_samples": 8,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    harness = json.loads((tmp_path / "run" / "eval" / "lm_eval" / "report.json").read_text())
    accuracy = [[p["accuracy"] for p in r["points"]] for r in report["tasks"][0]["rows"]]
    assert accuracy == [[p["accuracy"] for p in r["points"]] for r in harness["tasks"][0]["rows"]]
    assert harness["run"] == "lm-eval-test" and harness["tasks"][0]["rows"][0]["name"] == "teacher"
    # `distill eval`, the eval stage on its own, ends the same way.
    assert main(["eval", str(path), f"run.output_dir={tmp_path / 'eval'}"]) == 0
    again = json.loads((tmp_path / "eval" / "eval" / "lm_eval" / "report.json").read_text())
    measured = [[(p["knob"], p["accuracy"], p["tpf"]) for p in r["points"]] for r in harness["tasks"][0]["rows"]]
    assert [[(p["knob"], p["accuracy"], p["tpf"]) for p in r["points"]] for r in again["tasks"][0]["rows"]] == measured

    # Without a sweep: one harness run per row at its first decoder's settings, any task type.
    once = [f"run.output_dir={tmp_path / 'once'}", "eval.lm_eval.sweep=false", f"eval.lm_eval.tasks=[{TASK},{MC_TASK}]"]
    assert main(["run", str(path), *once]) == 0
    results = json.loads((tmp_path / "once" / "eval" / "lm_eval" / "teacher" / "results.json").read_text())
    assert results["decoder"]["threshold"] == 0.9 and results["model"]["mc_num"] == 32
    assert results["fewstep"][TASK]["requests"] == 8 and results["fewstep"][TASK]["tpf"] > 1
    assert results["fewstep"][MC_TASK]["requests"] == 0 and results["fewstep"][MC_TASK]["metric"] == "acc,none"
    assert len(jsonl(tmp_path / "once" / "eval" / "lm_eval" / "teacher" / f"{MC_TASK}.jsonl")) == 8

    # The section is strict like the rest, and an unknown task is refused before any work.
    with pytest.raises(RecipeError, match="eval.lm_eval.limt: unknown key"):
        load_recipe(path, ["eval.lm_eval.limt=3"])
    assert main(["run", str(path), "eval.lm_eval.tasks=[nothing_here]", f"run.output_dir={tmp_path / 'x'}"]) == 2
    assert not (tmp_path / "x").exists()
