"""The `distill` command line: `run`, `validate` and `eval`, each taking a recipe plus dotted overrides.

    distill run recipes/teacher-tiny.yaml train.lr=3e-4 run.output_dir=runs/x
    distill validate recipes/teacher-tiny.yaml
    distill eval recipes/teacher-tiny.yaml --checkpoint runs/teacher-tiny/teacher --task addition

A malformed recipe or override exits with code 2 and one line naming the dotted path, before anything is
written. Other expected failures (missing checkpoint, bad data file) exit with code 1 and one line.
"""

from __future__ import annotations

import argparse
import os
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


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="distill", description="fewstep: distil diffusion LMs into few-step decoders.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=ArgumentParser)

    run = verbs.add_parser("run", help="run a recipe's stages end to end", description="Run a recipe end to end.")
    _add_recipe_arguments(run)

    validate = verbs.add_parser(
        "validate",
        help="check a recipe and print it fully resolved",
        description="Validate a recipe (and overrides) and print the fully resolved recipe; writes nothing.",
    )
    _add_recipe_arguments(validate)

    evaluate = verbs.add_parser(
        "eval",
        help="decode an eval split with a checkpoint and print accuracy, NFE and TPF",
        description="Evaluate a checkpoint on the recipe's eval tasks with the recipe's decoder.",
    )
    _add_recipe_arguments(evaluate)
    evaluate.add_argument(
        "--checkpoint", type=Path, help="model directory (default: <run.output_dir>/teacher)", default=None
    )
    evaluate.add_argument("--task", action="append", help="task to evaluate (repeatable; default: eval.tasks)")
    evaluate.add_argument("--row", default=None, help="row name in the output (default: the checkpoint's name)")
    return parser


def _load(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from distill.recipe import dump_recipe

    recipe = _load(args)
    sys.stdout.write(dump_recipe(recipe))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    recipe = _load(args)
    from distill.run import run

    summary = run(recipe)
    print(f"[run] done in {summary['total_seconds']} s; outputs in {summary['output_dir']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    recipe = _load(args)
    out_dir = Path(recipe.run.output_dir)
    checkpoint = args.checkpoint or out_dir / "teacher"
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint: {checkpoint} is not a model directory (no config.json)")
    for task in args.task or []:
        if task not in recipe.data.task_names():
            raise RecipeError(f"--task: '{task}' is not in data (have: {', '.join(recipe.data.task_names())})")
    from distill.run import evaluate_rows
    from eval.tasks import build_task_datasets

    if args.task:
        recipe.eval.tasks = args.task
    datasets = build_task_datasets(recipe.data, recipe.run.seed, out_dir / "data")
    row = args.row or checkpoint.name
    evaluate_rows(recipe, datasets, {row: checkpoint}, out_dir / f"eval-{row}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "eval": cmd_eval}


def _quiet_libraries() -> None:
    # Our own progress display and one-line summaries carry the information; library chatter would bury them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.verb](args)
    except RecipeError as error:
        print(f"distill: recipe error: {error}", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    except (FileNotFoundError, ValueError) as error:
        print(f"distill: error: {error}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
