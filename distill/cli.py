"""The `distill` command line: `run`, `trajectories`, `validate`, `eval` and `bench decode` take a recipe plus dotted
overrides; `report` re-renders or merges finished reports; `export` and `verify` take a run or export folder;
`lm-eval` runs lm-evaluation-harness on a model folder.

    distill run recipes/teacher-tiny.yaml train.lr=3e-4 run.output_dir=runs/x
    distill validate recipes/teacher-tiny.yaml
    distill eval recipes/eval-tiny.yaml eval.max_samples=50           # -> <run.output_dir>/eval/report.*
    distill eval recipes/teacher-tiny.yaml --checkpoint runs/teacher-tiny/teacher --task addition
    distill report runs/a runs/b --out runs/compare                    # merge two runs' reports, no decoding
    distill bench decode recipes/eval-tiny.yaml --samples 32 --repeats 5   # decoders with and without cache
    distill lm-eval --model-args pretrained=exports/llada-d3 --tasks gsm8k --out runs/lm-eval   # the harness
    distill lm-eval --model-args pretrained=runs/x,decoder=confident --tasks gsm8k --sweep --out runs/x-gsm8k
    distill trajectories recipes/teacher-tiny.yaml teacher.path=runs/teacher-tiny/teacher trajectories.block_length=8
    torchrun --nproc_per_node 2 -m distill.cli trajectories RECIPE [overrides]   # shards split over ranks
    torchrun --nproc_per_node 2 -m distill.cli eval RECIPE [overrides]   # eval batches split over ranks, resumable
    distill export runs/quickstart --out exports/quickstart --dtype bf16   # a folder that loads without fewstep
    distill verify exports/quickstart                                     # reload it without fewstep, compare

A malformed recipe or override exits with code 2 and one line naming the dotted path, before anything is
written; so do an export whose --out exists without --overwrite or is, holds or lies inside a run directory, and
`verify` of a folder whose code fewstep did not write, without --trust-remote-code. Other expected failures
(missing checkpoint, bad data file, a checkpoint that cannot be exported, a failed verification, a training run
that diverged, a decode on NaN logits) exit with code 1 and one line. Ctrl-C, or SIGTERM during an export, exits
with 128 + the signal's number and one line, the export's half-written folder removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from distill.recipe import Recipe, RecipeError, load_recipe

EXIT_RECIPE_ERROR = 2
EXIT_RUNTIME_ERROR = 1


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # argparse's own usage errors also exit 2, as one line.
        self.exit(EXIT_RECIPE_ERROR, f"distill: error: {message}\n")


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="recipe YAML file")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides: key.path=value (value parsed as YAML), ~key.path deletes a key",
    )


def _add_strict_hash(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict-hash",
        action="store_true",
        help="identify the teacher by the sha256 of its weights, not their sizes and mtimes (run.strict_hash=true)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="distill", description="fewstep: distil diffusion LMs into few-step decoders.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=ArgumentParser)

    run = verbs.add_parser("run", help="run a recipe's stages end to end", description="Run a recipe end to end.")
    _add_recipe_arguments(run)
    _add_strict_hash(run)

    trajectories = verbs.add_parser(
        "trajectories",
        help="decode the training prompts with the teacher and record its unmasking order",
        description=(
            "Decode every training prompt with the teacher, one token per forward, and write the pseudo-trajectory "
            "set to <run.output_dir>/trajectories/ (resumable; sharded over ranks under torchrun)."
        ),
    )
    _add_recipe_arguments(trajectories)
    _add_strict_hash(trajectories)

    validate = verbs.add_parser(
        "validate",
        help="check a recipe and print it fully resolved",
        description="Validate a recipe (and overrides), read its data files (rows and images), and print the fully "
        "resolved recipe; writes nothing.",
    )
    _add_recipe_arguments(validate)

    evaluate = verbs.add_parser(
        "eval",
        help="sweep the eval decoders over every row and write the AUP report",
        description=(
            "Decode the recipe's eval tasks with every row (eval.rows, eval.checkpoints) and every eval decoder, "
            "sweeping each decoder's knob; write report.json/.md/.html and per-sample logs to "
            "<run.output_dir>/eval/; with eval.lm_eval, then run lm-evaluation-harness into eval/lm_eval/. "
            "Resumable (finished batches are kept in eval/shards/); under torchrun the batches split over ranks."
        ),
    )
    _add_recipe_arguments(evaluate)
    evaluate.add_argument(
        "--checkpoint", type=Path, default=None, help="evaluate only this model directory instead of the recipe's rows"
    )
    evaluate.add_argument("--task", action="append", help="task to evaluate (repeatable; default: eval.tasks)")
    evaluate.add_argument(
        "--row", default=None, help="row name of --checkpoint (default: its directory name; ar-baseline decodes AR)"
    )

    report = verbs.add_parser(
        "report",
        help="re-render or merge evaluation reports without decoding",
        description=(
            "Read report.json from each RUN_DIR (or RUN_DIR/eval), rescore AUP against the best accuracy over all "
            "rows, and write report.json/.md/.html. One RUN_DIR without --out is re-rendered in place."
        ),
    )
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directory or report.json")
    report.add_argument("--out", type=Path, default=None, help="output directory (required for several RUN_DIRs)")

    export = verbs.add_parser(
        "export",
        help="write a distilled checkpoint as a Hugging Face folder that loads without fewstep, and verify it",
        description=(
            "Consolidate a distillation checkpoint of RUN_DIR (ZeRO 0-3), rebuild the student, merge its LoRA "
            "adapters (or keep them as a peft folder) and write a Hugging Face folder with its modeling code, "
            "tokenizer, decoding defaults and model card; then verify it in a process that cannot import fewstep. "
            "Options not given come from the run recipe's export section."
        ),
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory written by `distill run`")
    export.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    export.add_argument(
        "--checkpoint", type=_checkpoint, default=None, help="latest (default) or the optimizer step to export"
    )
    export.add_argument(
        "--merge-lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fold LoRA adapters into the weights (default), or keep them in adapter/",
    )
    export.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="weights dtype (default fp32)")
    export.add_argument("--max-shard-size", default=None, help="largest safetensors shard, e.g. 5GB (default)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None, help="verify the folder (default: yes)"
    )

    verify = verbs.add_parser(
        "verify",
        help="check an exported folder against the checkpoint it came from, without fewstep",
        description=(
            "Check the folder's files, reload it in a process that cannot import fewstep, compare its logits with "
            "the checkpoint's student and its diffusion_generate with fewstep's decoder; writes verify.json."
        ),
    )
    verify.add_argument("folder", type=Path, metavar="DIR", help="a folder written by `distill export`")
    verify.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run DIR's Python files even though fewstep did not write them (a folder it did not export, or edited)",
    )

    lm_eval = verbs.add_parser(
        "lm-eval",
        help="score a model on lm-evaluation-harness tasks; --sweep its decoder's knob into an AUP report",
        description=(
            "Run lm-evaluation-harness (GSM8K, MATH, HumanEval, MBPP, local task YAMLs) with fewstep's model "
            "`fewstep`: once at the decoder's settings (results.json), or once per value of the decoder's knob "
            "(--sweep), each task's accuracy and TPF going into the AUP report (report.json/.md/.html). Settings "
            "are eval.lm_eval's (distill/recipe.py: LmEvalConfig)."
        ),
    )
    lm_eval.add_argument(
        "--model-args",
        "--model_args",
        required=True,
        help="pretrained=DIR (checkpoint, export or run directory)[,row=student][,decoder=NAME][,threshold=...]"
        "[,steps=...][,block_length=...][,gen_length=...][,batch_size=...][,mc_num=...]: eval/lm_eval.py",
    )
    lm_eval.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    lm_eval.add_argument("--include-path", "--include_path", type=Path, default=None, help="folder of task YAMLs")
    lm_eval.add_argument("--num-fewshot", "--num_fewshot", type=int, default=None, help="default: each task's own")
    lm_eval.add_argument("--limit", type=float, default=None, help="documents per task (count, or fraction < 1)")
    lm_eval.add_argument("--metric", default=None, help="harness metric read as accuracy (exact_match,strict-match)")
    lm_eval.add_argument(
        "--apply-chat-template",
        "--apply_chat_template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prompts in the model's chat template (default: yes)",
    )
    lm_eval.add_argument(
        "--fewshot-as-multiturn",
        "--fewshot_as_multiturn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="few-shot examples as their own chat turns (default: yes)",
    )
    lm_eval.add_argument(
        "--confirm-run-unsafe-code",
        "--confirm_run_unsafe_code",
        action="store_true",
        help="let tasks run the generated code (HumanEval, MBPP)",
    )
    lm_eval.add_argument(
        "--sweep",
        nargs="?",
        const="auto",
        default=None,
        help="sweep the decoder's knob: auto (from one token per forward until accuracy falls past AUP's cut-off) "
        "or comma-separated values",
    )
    lm_eval.add_argument("--out", type=Path, required=True, help="output directory")

    bench = verbs.add_parser("bench", help="benchmarks", description="Benchmarks.")
    benches = bench.add_subparsers(dest="bench", required=True, parser_class=ArgumentParser)
    decode = benches.add_parser(
        "decode",
        help="time the eval decoders with and without KV cache on the same prompts",
        description=(
            "Time each eval decoder (first knob value) with cache none, prompt and blocks on the same eval "
            "prompts; write the medians, speedups and output agreement as JSON."
        ),
    )
    _add_recipe_arguments(decode)
    decode.add_argument(
        "--checkpoint", type=Path, default=None, help="model directory (default: teacher.path or <output_dir>/teacher)"
    )
    decode.add_argument("--task", default=None, help="task whose eval prompts are used (default: the first eval task)")
    decode.add_argument("--samples", type=_positive_int, default=32, help="prompts decoded (default 32)")
    decode.add_argument("--repeats", type=_at_least_five, default=5, help="timed runs per setting, >= 5 (default 5)")
    decode.add_argument("--out", type=Path, default=None, help="JSON file (default <output_dir>/bench/decode.json)")
    decode.add_argument(
        "--batch-sizes", type=_positive_ints, default=None, help="comma-separated batch sizes (default eval.batch_size)"
    )
    decode.add_argument(
        "--paths",
        type=_decoding_paths,
        default=None,
        help="comma-separated decoding paths among eager, static, compiled (default eager,static; all three on a GPU)",
    )
    decode.add_argument(
        "--ar",
        type=Path,
        default=None,
        help="AR checkpoint decoded with a KV cache beside the decoders (default <output_dir>/ar-baseline if present)",
    )
    decode.add_argument("--no-ar", action="store_true", help="leave the AR baseline out")
    train = benches.add_parser(
        "train",
        help="time the distillation step under each DeepSpeed profile: step time, tokens/s, MFU",
        description=(
            "Build the recipe's distillation under each DeepSpeed profile and time its steps; write step times, "
            "tokens/s, FLOPs per step and MFU as JSON (launch with torchrun for several ranks)."
        ),
    )
    _add_recipe_arguments(train)
    train.add_argument(
        "--profiles", default=None, help="comma-separated DeepSpeed profiles (default: every shipped profile)"
    )
    train.add_argument("--steps", type=_at_least_five, default=5, help="timed steps per profile, >= 5 (default 5)")
    train.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    train.add_argument("--peak-tflops", type=float, default=None, help="also report MFU against this peak (TFLOP/s)")
    train.add_argument("--out", type=Path, default=None, help="JSON file (default <output_dir>/bench/train.json)")
    return parser


def _positive_ints(text: str) -> list[int]:
    values = [word.strip() for word in text.split(",") if word.strip()]
    if not values or not all(value.isdigit() and int(value) > 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [int(value) for value in values]


def _decoding_paths(text: str) -> tuple[str, ...]:
    from eval.bench import PATHS

    values = tuple(word.strip() for word in text.split(",") if word.strip())
    unknown = [value for value in values if value not in PATHS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown decoding path {unknown[0] if unknown else text!r} ({', '.join(PATHS)})"
        )
    return values


def _checkpoint(text: str) -> str | int:
    if text == "latest":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected latest or an optimizer step >= 1, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _at_least_five(text: str) -> int:
    value = int(text)
    if value < 5:
        raise argparse.ArgumentTypeError(f"a median needs at least 5 runs, got {value}")
    return value


def _load(args: argparse.Namespace) -> Recipe:
    # A flag is an override like any other, applied last so that it wins over the same key given as an override.
    flags = ["run.strict_hash=true"] if getattr(args, "strict_hash", False) else []
    return load_recipe(args.recipe, [*args.overrides, *flags])


def cmd_validate(args: argparse.Namespace) -> int:
    from distill.recipe import dump_recipe
    from eval.userdata import load_file_source

    recipe = _load(args)
    # The data files too, as `run` reads them before work (a bad row or image exits 2 naming the file and row);
    # the generated tasks are left to `run` (drawing them is the data stage's work).
    for source in recipe.data.files:
        try:
            load_file_source(source)
        except ValueError as error:
            raise RecipeError(str(error)) from None
    sys.stdout.write(dump_recipe(recipe))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    recipe = _load(args)
    from distill.run import is_main_process, run, summary_lines

    summary = run(recipe)
    if is_main_process():
        for line in summary_lines(summary):
            print(f"[run] {line}")
    print(f"[run] done in {summary['total_seconds']} s; outputs in {summary['output_dir']}")
    return 0


def cmd_trajectories(args: argparse.Namespace) -> int:
    recipe = _load(args)
    try:
        recipe.trajectories.check_canvas(recipe.data.max_response_tokens)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    from distill.run import check_before_work, held_run_directory
    from distill.trajectories import trajectories_command

    check_before_work(recipe, ["trajectories"])
    with held_run_directory(Path(recipe.run.output_dir)):
        trajectories_command(recipe)
    return 0


def _check_tasks(recipe: Recipe, tasks: list[str]) -> None:
    for task in tasks:
        if task not in recipe.data.task_names():
            raise RecipeError(f"--task: '{task}' is not in data (have: {', '.join(recipe.data.task_names())})")


def cmd_eval(args: argparse.Namespace) -> int:
    recipe = _load(args)
    _check_tasks(recipe, args.task or [])
    from distill.run import (
        benchmark_rows,
        check_before_work,
        eval_rows,
        evaluate_rows,
        held_run_directory,
        is_main_process,
    )
    from eval.tasks import write_task_datasets

    out_dir = Path(recipe.run.output_dir)
    if args.task:
        recipe.eval.tasks = args.task
    datasets = check_before_work(recipe, [] if args.checkpoint is not None else ["eval"])
    if args.checkpoint is not None:
        if not (args.checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoint: {args.checkpoint} is not a model directory (no config.json)")
        rows = {args.row or args.checkpoint.name: args.checkpoint}
    else:
        rows = eval_rows(recipe, {})
    with held_run_directory(out_dir):
        # Under a launcher every rank decodes its share (`evaluate_rows`, from the datasets in memory); rank 0 alone
        # writes the data, the logs and the report, and runs lm-eval while the others wait at `entry`'s barrier.
        if is_main_process():
            write_task_datasets(datasets, recipe.data, recipe.run.seed, out_dir / "data")
        evaluate_rows(recipe, datasets, rows, out_dir / "eval")
        if is_main_process():
            benchmark_rows(recipe, rows, out_dir / "eval" / "lm_eval")  # eval.lm_eval, when the recipe has it
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from eval.report import aup_lines, load_report, merge_reports, score_report, write_report

    if len(args.run_dirs) > 1 and args.out is None:
        print("distill: error: --out is required when merging several reports", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    reports = [load_report(path) for path in args.run_dirs]
    out_dir = args.out or Path(reports[0]["_dir"])
    in_place = len(reports) == 1 and out_dir.resolve() == Path(reports[0]["_dir"]).resolve()
    # Merging also makes the per-sample log paths absolute, which a report written elsewhere needs.
    report = score_report(reports[0]) if in_place else merge_reports(reports)
    write_report(report, out_dir)
    for line in aup_lines(report):
        print(f"[report] {line}")
    print(f"[report] written to {out_dir}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    recipe = _load(args)
    if args.bench == "train":
        return bench_train(recipe, args)
    if args.task is not None:
        _check_tasks(recipe, [args.task])
    from eval.bench import run_decode_bench

    out_dir = Path(recipe.run.output_dir)
    checkpoint = args.checkpoint or recipe.teacher.path or out_dir / "teacher"
    if not (Path(checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint: {checkpoint} is not a model directory (no config.json)")
    ar_checkpoint = None if args.no_ar else args.ar or out_dir / "ar-baseline"
    if ar_checkpoint is not None and not (Path(ar_checkpoint) / "config.json").is_file():
        if args.ar is not None:
            raise FileNotFoundError(f"--ar: {ar_checkpoint} is not a model directory (no config.json)")
        ar_checkpoint = None  # the default: only when the run has one
    run_decode_bench(
        recipe,
        Path(checkpoint),
        task=args.task,
        samples=args.samples,
        repeats=args.repeats,
        out_path=args.out or out_dir / "bench" / "decode.json",
        batch_sizes=args.batch_sizes,
        paths=args.paths,
        ar_checkpoint=ar_checkpoint,
    )
    return 0


def bench_train(recipe, args: argparse.Namespace) -> int:
    from distill.recipe import deepspeed_profiles

    profiles = [name.strip() for name in args.profiles.split(",") if name.strip()] if args.profiles else None
    unknown = [name for name in profiles or [] if name not in deepspeed_profiles()]
    if unknown:
        raise RecipeError(f"--profiles: unknown profile '{unknown[0]}' (profiles: {', '.join(deepspeed_profiles())})")
    if args.warmup < 0:
        raise RecipeError(f"--warmup: must be >= 0, got {args.warmup}")
    from distill.bench_train import run_train_bench  # imports DeepSpeed

    out_path = args.out or Path(recipe.run.output_dir) / "bench" / "train.json"
    run_train_bench(
        recipe, profiles=profiles, steps=args.steps, warmup=args.warmup, out_path=out_path, peak_tflops=args.peak_tflops
    )
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from distill.recipe import LmEvalConfig
    from eval.benchmarks import lm_eval_command, prepare
    from eval.lm_eval import parse_model_args

    flags = {
        "tasks": [task.strip() for task in args.tasks.split(",") if task.strip()],
        "include_path": args.include_path,
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "metric": args.metric,
        "apply_chat_template": args.apply_chat_template,
        "fewshot_as_multiturn": args.fewshot_as_multiturn,
        "confirm_run_unsafe_code": args.confirm_run_unsafe_code,
    }
    # Every argument is checked before the weights load: a bad one exits 2 with one line.
    try:
        try:
            config = LmEvalConfig.model_validate(flags)
        except ValidationError as error:
            first = error.errors()[0]
            flag = "--" + str(first["loc"][0]).replace("_", "-")
            raise ValueError(f"{flag}: {first['msg'].removeprefix('Value error, ')}") from None
        sweep = None if args.sweep is None else _sweep_values(args.sweep)
        prepared = prepare(parse_model_args(args.model_args), config, sweep)
    except ValueError as error:
        print(f"distill: error: {error}", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    lm_eval_command(prepared, config, args.out)
    return 0


def _sweep_values(text: str) -> str | list[float]:
    if text == "auto":
        return text
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"--sweep: expected auto or comma-separated numbers, got {text!r}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from distill.export import OutputRefused, check_out, export_command

    try:
        check_out(args.run_dir, args.out)
    except OutputRefused as error:
        print(f"distill: error: {error}", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    if args.out.exists() and not args.overwrite:
        print(f"distill: error: --out {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return EXIT_RECIPE_ERROR

    export_command(
        args.run_dir,
        args.out,
        checkpoint=args.checkpoint,
        merge_lora=args.merge_lora,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=int(args.max_shard_size) if (args.max_shard_size or "").isdigit() else args.max_shard_size,
        verify=args.verify,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from distill.export import verify_folder
    from distill.verify import RemoteCodeRefused, summary_line

    try:
        result = verify_folder(args.folder, trust_remote_code=args.trust_remote_code)
    except RemoteCodeRefused as error:
        print(f"distill: error: {error}", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    print(f"[verify] {args.folder}: ok ({summary_line(result)}; {result['seconds']} s)")
    return 0


COMMANDS = {
    "run": cmd_run,
    "trajectories": cmd_trajectories,
    "validate": cmd_validate,
    "eval": cmd_eval,
    "report": cmd_report,
    "bench": cmd_bench,
    "lm-eval": cmd_lm_eval,
    "export": cmd_export,
    "verify": cmd_verify,
}


def _quiet_libraries() -> None:
    # Our own progress display and one-line summaries carry the information; library chatter would bury them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; overrides may also follow a flag (`eval r.yaml --checkpoint d key=value`)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher passes `--local_rank=N` first (unless run with --no_local_rank); the rank is read
    # from the LOCAL_RANK environment variable it also sets.
    argv = [word for word in argv if not word.startswith("--local_rank")]
    # argparse stops filling a nargs="*" positional at the first flag; words left over after it that are not
    # flags are more overrides of the same command.
    args, leftover = parser.parse_known_args(argv)
    stray = [word for word in leftover if word.startswith("-") and not word.startswith("~")]
    if stray or (leftover and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or leftover)}")
    if leftover:
        args.overrides = [*args.overrides, *leftover]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.verb](args)
    except RecipeError as error:
        print(f"distill: recipe error: {error}", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    except (OSError, ValueError) as error:  # OSError: a missing file, a full disk, a folder not writable
        print(f"distill: error: {error}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM during an export (`distill.export.Interrupted`)
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"distill: {args.verb} interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except RuntimeError as error:
        # Only the trainer raises TrainingDiverged, so it can be one only once the trainer (and DeepSpeed, slow to
        # import) is loaded. Every rank raises it; rank 0 reports it.
        trainer = sys.modules.get("distill.trainer")
        if trainer is None or not isinstance(error, trainer.TrainingDiverged):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"distill: error: {error}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR


def entry() -> None:
    """The console script: `main`, then leave the process group so a launched rank exits cleanly.

    (A process that exits with gloo's threads still running can abort at exit. `main` itself leaves the group
    alone: in-process callers run several commands on one group, which DeepSpeed caches.)
    """
    code = main()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    entry()
