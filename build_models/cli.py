"""``build-models``: build a recipe into the model store, list the store, write a report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from typing import get_args

from build_models.errors import BuildError
from build_models.recipe import Strategy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="build-models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build every variant of a recipe, evaluate, gate and publish",
                       description="Build every variant of RECIPE (a YAML file), or with --source alone the "
                                   "default variants of a checkpoint directory; evaluate, gate and publish.")
    b.add_argument("recipe", type=Path, nargs="?", metavar="RECIPE", help="recipe YAML file (optional with --source)")
    b.add_argument("--source", type=Path, metavar="PATH",
                   help="a local Hugging Face or sentence-transformers checkpoint directory. Alone: build its "
                        "default variants, NAME (ONNX, ORT-fused, per-channel dynamic int8) and NAME-fp32 (ONNX, "
                        "ORT-fused), evaluated on Reuters R8 as the minilm recipe and gated: embeddings on probe "
                        "retention and mean cosine >= 0.99, classifiers on agreement with the fp32 model >= 0.98 "
                        "(and accuracy retention >= 0.98 when the labels are R8's). With RECIPE: replaces the "
                        "recipe's source, everything else as the recipe says")
    b.add_argument("--task", choices=["embedding", "classification"],
                   help="with --source alone: default classification when the checkpoint's config.json names a "
                        "*ForSequenceClassification architecture, else embedding (refused with RECIPE, which "
                        "sets its own)")
    b.add_argument("--name", metavar="NAME",
                   help="with --source alone: the model name (default: the checkpoint folder's name, or its "
                        "parent's for a generic one such as model/ or a snapshot hash, lowercased, other "
                        "characters '-'); refused with RECIPE, which names its own variants")
    b.add_argument("--store", type=Path, default=Path("model_store"))
    b.add_argument("--variant", action="append", dest="variants", metavar="NAME",
                   help="build only this variant (repeatable)")
    b.add_argument("--allow-below-gate", action="store_true",
                   help="publish variants that miss a quality gate (the manifest records the failure)")
    b.add_argument("--strategy", choices=get_args(Strategy),
                   help="how training steps (distill, finetune) spread over the processes; overrides the "
                        "recipe. auto: ddp under torchrun with several processes, else single")
    b.add_argument("--parameter-server-mode", choices=["sync", "async"],
                   help="under --strategy parameter_server: sync (one averaged update per global batch, the "
                        "same updates as one process) or async (each trainer's push applied as it comes); "
                        "overrides the recipe")
    b.add_argument("--max-staleness", type=int, metavar="N",
                   help="async parameter server: refuse a gradient computed on parameters more than N "
                        "updates old (the trainer recomputes it); overrides the recipe")
    b.add_argument("--micro-batches", type=int, metavar="N",
                   help="strategy pipeline: micro-batches per global batch (batch_size must divide by N); "
                        "overrides the recipe")
    b.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b"],
                   help="strategy pipeline: the order of micro-batch forwards and backwards; overrides the recipe")
    b.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others (joining, each collective) "
                        "before the build fails instead of hanging (default 1800)")
    b.set_defaults(usage_error=b.error)
    l = sub.add_parser("list", help="table of every variant in the store")
    l.add_argument("--store", type=Path, default=Path("model_store"))
    l.add_argument("--verify", action="store_true", help="also check every file's sha256")
    r = sub.add_parser("report", help="Markdown report with a quality-vs-throughput plot")
    r.add_argument("--store", type=Path, default=Path("model_store"))
    r.add_argument("--out", type=Path, default=Path("reports"))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    if args.command == "build":
        _check_build_args(args)
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "list":
            from build_models.catalog import render_table

            print(render_table(args.store, verify=args.verify))
            return 0
        from build_models.catalog import write_report

        path = write_report(args.store, args.out)
        print(f"report written to {path}")
        return 0
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing from this run was published; the store is unchanged", file=sys.stderr)
        return 130


def _check_build_args(args) -> None:
    """argparse errors (usage, exit 2) for combinations no single option can refuse by itself."""
    if args.recipe is None and args.source is None:
        args.usage_error("give a RECIPE file or --source PATH (a checkpoint directory)")
    if args.recipe is not None:
        given = [flag for flag, value in (("--task", args.task), ("--name", args.name)) if value is not None]
        if given:
            args.usage_error(f"{' and '.join(given)}: not with a RECIPE file, which sets its own task and "
                             f"variant names; for --source without one")


def _recipe_from_args(args):
    """(recipe, its file or None, origin for the lineage), with every source check done: bad input is
    refused here, before the build's heavy imports (torch alone takes seconds)."""
    from build_models.recipe import SourceConfig, check_family_name, default_recipe, family_from_path, load_recipe
    from build_models.sources import checkpoint_config, default_task, resolve_source

    origin = None
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        if args.source is not None:
            source = _absolute(args.source)
            recipe.source = SourceConfig(path=str(source))
            origin = f"source replaced by --source {source}"
    else:
        source = _absolute(args.source)
        task = args.task or default_task(checkpoint_config(source))
        family = check_family_name(args.name) if args.name is not None else family_from_path(source)
        recipe = default_recipe(source, task, family)
        origin = f"build-models build --source {source} (default variants, task {task})"
    base_dir = args.recipe.parent if args.recipe is not None else None
    resolve_source(recipe.source, recipe.task, base_dir=base_dir, labels_from_teacher=bool(recipe.teacher))
    return recipe, args.recipe, origin


def _absolute(path: Path) -> Path:
    # Normalised ('.', '..') for the name and the lineage, but symlinks kept: a link's name is the user's choice.
    return Path(os.path.abspath(path.expanduser()))


def _build(args) -> int:
    recipe, recipe_path, origin = _recipe_from_args(args)

    from build_models.pipeline import build
    from build_models.training.distributed import World, first_line, lost_a_peer

    _quiet_libraries()
    if args.max_staleness is not None and args.max_staleness < 0:
        raise BuildError(f"--max-staleness must be 0 or more, got {args.max_staleness}")
    overrides = {"strategy": args.strategy, "parameter_server_mode": args.parameter_server_mode,
                 "max_staleness": args.max_staleness, "micro_batches": args.micro_batches,
                 "pipeline_schedule": args.pipeline_schedule}
    for cfg in [*recipe.teacher, *(s for v in recipe.variants for s in v.steps)]:
        for field, value in overrides.items():
            if value is not None and hasattr(cfg, field):
                setattr(cfg, field, value)
    world = World.from_env(timeout_s=args.dist_timeout)
    log = _stderr if world.is_main else (lambda msg: _stderr(f"[rank {world.rank}] {msg}"))
    if world.distributed:
        _say_why_when_stopped(world.rank)
    try:
        result = build(recipe_path, args.store, only=args.variants, allow_below_gate=args.allow_below_gate,
                       log=log, recipe=recipe, world=world, origin=origin)
    except RuntimeError as exc:
        if not world.distributed or isinstance(exc, BuildError) or not lost_a_peer(exc):
            raise
        raise BuildError(f"rank {world.rank}: lost contact with another rank during the build "
                         f"({first_line(exc)[:300]}); "
                         f"a rank died or stopped answering: see its own error. Nothing was published") from None
    finally:
        world.close()
    if not world.is_main:
        return 0
    failures = result.gate_failures
    if failures and not args.allow_below_gate:
        for line in failures:
            print(f"not published: {line}", file=sys.stderr)
        print(f"error: {len(failures)} quality gate(s) failed; rerun with --allow-below-gate to publish anyway",
              file=sys.stderr)
        return 1
    return 0


def _say_why_when_stopped(rank: int) -> None:
    """torchrun ends the other ranks with SIGTERM when one fails: say so on each of them, instead of
    vanishing without a word (torchrun's own summary names the rank that failed first)."""
    import signal

    def stopped(signum, _frame):
        _stderr(f"[rank {rank}] stopped: the launcher ended this rank ({signal.Signals(signum).name}), most often "
                f"because another rank failed; see that rank's error above or torchrun's 'Root Cause'. "
                f"Nothing was published")
        os._exit(128 + signum)  # no cleanup: collectives with a dead peer could block it

    signal.signal(signal.SIGTERM, stopped)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
