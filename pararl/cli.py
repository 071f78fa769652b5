"""The ``pararl`` command: thin subcommands that call into the stage packages.

The one module of the core that reaches up to the stages, and only inside a subcommand, so
``pararl --help`` and one subcommand load nothing they do not use.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pararl.errors import PararlError


def _sample(args: argparse.Namespace) -> int:
    from rollout.sample_command import sample_to_folder

    sample_to_folder(
        model=args.model, prompt=args.prompt, image=args.image, out=args.out, seed=args.seed,
        snapshots=args.snapshots, overrides=args.overrides,
    )
    return 0


def _reward_stats(args: argparse.Namespace) -> int:
    from cluster.reward_stats import reward_stats

    reward_stats(args.config, args.overrides)
    return 0


def _train(args: argparse.Namespace) -> int:
    from cluster.train import train

    out = train(args.config, args.overrides)
    return 128 + out["signal"] if out["signal"] else 0  # a run stopped by SIGTERM/SIGINT is not a finished run


def _export(args: argparse.Namespace) -> int:
    from learner.cli import export_main

    return export_main(args) or 0


def _default_run(args: argparse.Namespace) -> int:
    from shapeworld.default_run import DEFAULT_CONFIG as DEFAULT_RUN_CONFIG
    from shapeworld.default_run import default_run

    default_run(args.config or DEFAULT_RUN_CONFIG, overrides=args.overrides, cache_dir=args.cache)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cluster.eval_command import eval_main

    return eval_main(args)


def _convert_data(args: argparse.Namespace) -> int:
    from pararl.data_convert import convert

    path = convert(args.source, args.out, prompt=args.prompt_field, image=args.image_field, answer=args.answer_field,
                   task=args.task, task_field=args.task_field, size=tuple(args.size) if args.size else None)
    print(f"records: {path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from cluster.doctor import doctor_main

    return doctor_main(args)


def _plan(args: argparse.Namespace) -> int:
    from cluster.plan.command import plan_main

    return plan_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pararl", description="ParaRL for parallel text+image diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="generate one output (image + text) and a picture of its snapshots")
    s.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer, pararl.json)")
    s.add_argument("--prompt", required=True, help="instruction text")
    s.add_argument("--image", help="input image (PNG) for editing; must have the tokenizer's resolution")
    s.add_argument("--out", required=True, help="folder for image.png, text.txt, snapshots.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--snapshots", type=int, default=6, help="how many evenly spaced steps to picture")
    s.add_argument("overrides", nargs="*", help="sampler settings as key=value (e.g. steps=32 cfg_image=4)")
    s.set_defaults(run=_sample)

    r = sub.add_parser("reward-stats", help="measure the reward models' mean and Z over the training data")
    r.add_argument("config", help="run config (YAML)")
    r.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")
    r.set_defaults(run=_reward_stats)

    t = sub.add_parser("train", help="run ParaRL on Ray (a local Ray by default; cluster.address joins one)")
    t.add_argument("config", help="run config (YAML)")
    t.add_argument("overrides", nargs="*", help="config overrides as dotted key=value (e.g. train.resume=true)")
    t.set_defaults(run=_train)

    from learner.cli import add_export_arguments  # argparse only: cheap

    e = sub.add_parser("export", help="write a checkpoint's policy as a model folder that load_policy loads")
    add_export_arguments(e)
    e.set_defaults(run=_export)

    dr = sub.add_parser("default-run", help="the default run (make train): world, warm-up, CLIP, ParaRL, evaluation")
    dr.add_argument("--cache", default=".cache/pararl-default", help="where the world, warm-up and CLIP are kept")
    dr.add_argument("--config", default=None, help="a run config on the world (configs/default.yaml; "
                    "configs/unigrpo-world.yaml adds UniGRPO's tasks through its world: section)")
    dr.add_argument("overrides", nargs="*", help="run config overrides as dotted key=value")
    dr.set_defaults(run=_default_run)

    ev = sub.add_parser("eval", help="sample held-out prompts with one or two models, judge them (ParaBench's six "
                                     "scores), compare paired, write eval.json and report.html")
    ev.add_argument("config", help="run config (YAML): the sampler, model format, reward models, evaluation: section")
    ev.add_argument("--model", required=True, help="model folder to evaluate")
    ev.add_argument("--baseline", help="model folder to compare with, sample by sample on the same seeds")
    ev.add_argument("--data", help="held-out records (JSONL; default: the config's data.eval)")
    ev.add_argument("--samples", type=int, help="samples per prompt (default: evaluation.samples)")
    ev.add_argument("--judge", action="append", default=[], help="a judge by name (clip, vlm, world) or module:Class; "
                    "repeat for several (default: clip); its settings under evaluation.judges.NAME")
    ev.add_argument("--out", help="output folder (default: <run_dir>/eval); run again with it to resume")
    ev.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")
    ev.set_defaults(run=_eval)

    cd = sub.add_parser("convert-data", help="a Hugging Face dataset (a save_to_disk folder or Parquet files) as our "
                                             "JSONL records, input images as PNGs")
    cd.add_argument("source", help="a save_to_disk folder, a folder of .parquet / .arrow files, or one such file")
    cd.add_argument("--out", required=True, help="folder for records.jsonl and images/")
    cd.add_argument("--prompt-field", default="prompt", help="the column holding the instruction (default: prompt)")
    cd.add_argument("--image-field", help="the column holding the input image (datasets' Image, bytes or a path)")
    cd.add_argument("--answer-field", help="the column holding a reference answer (understand / reason tasks)")
    cd.add_argument("--task", help="every record's task (default: edit with an input image, else generate)")
    cd.add_argument("--task-field", help="the column naming each record's task")
    cd.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize input images to the image tokenizer's size")
    cd.set_defaults(run=_convert_data)

    from cluster.doctor import add_doctor_arguments  # argparse only: cheap

    d = sub.add_parser("doctor", help="check a run config against the model folder, reward, stats and the Ray cluster "
                                      "before spending GPU time")
    add_doctor_arguments(d)
    d.set_defaults(run=_doctor)

    from cluster.plan.command import add_plan_arguments  # argparse only: cheap

    pl = sub.add_parser("plan", help="each actor's GPU memory (and FLOPs) at the config's real shapes, measured on "
                                     "fake tensors from config.json alone, before any GPU is booked")
    add_plan_arguments(pl)
    pl.set_defaults(run=_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides after the options (`pararl eval CONFIG --model A key=value`): argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # library code logs; the command shows warnings (a step that trained nothing, tracking that went away)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (PararlError, FileNotFoundError) as err:  # the user's inputs; anything else is a bug: its traceback shows
        print(f"pararl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
