"""The `se-ray` command: one verb per job function (label, train, evaluate, run)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from se_ray.config import ConfigError, JobConfig, load_config

logger = logging.getLogger("se_ray")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML job config (default: the built-in CPU quickstart)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set sampling.num_samples=5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="se-ray",
        description="Fine-tune LLMs to abstain where semantic entropy says they would hallucinate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("label", help="sample answers, cluster them, compute semantic entropy, label")
    p.add_argument("--input", help="questions: .jsonl, .json, .parquet, a folder or a HF dataset")
    p.add_argument("--output", help="output folder or URI (labels/ is written inside)")
    _common(p)

    p = verbs.add_parser("train", help="fine-tune on labels with Ray Train + DeepSpeed ZeRO")
    p.add_argument("--labels", required=True, help="a labels/ folder or the run folder holding it")
    p.add_argument("--output", required=True, help="output folder for checkpoints and exports")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --output")
    _common(p)

    p = verbs.add_parser("evaluate", help="answer held-out questions greedily; accuracy, engagement, AED")
    p.add_argument("--model", help="model folder or LoRA adapter folder (default: the config's base model)")
    p.add_argument("--input", required=True, help="held-out questions with references")
    p.add_argument("--output", required=True, help="output folder")
    _common(p)

    p = verbs.add_parser("run", help="the whole job: split, label, train SE + baselines, evaluate, report")
    p.add_argument("--input", help="questions (default: the config's input)")
    p.add_argument("--output", help="output folder (default: the config's output)")
    _common(p)

    p = verbs.add_parser("prepare-models", help="prepare the built-in offline models into the cache")
    return parser


def _require(value: str | None, what: str) -> str:
    if not value:
        raise ConfigError(f"{what} is required (flag or config key)")
    return value


def _dispatch(args: argparse.Namespace, cfg: JobConfig) -> dict[str, Any]:
    if args.verb == "label":
        from se_ray.label import label_job

        return label_job(
            cfg, _require(args.input or cfg.input, "--input"), _require(args.output or cfg.output, "--output")
        )
    if args.verb == "train":
        from se_ray.train import train_job

        return train_job(cfg, labels=args.labels, output=args.output, resume=args.resume)
    if args.verb == "evaluate":
        from se_ray.evaluate import evaluate_job

        return evaluate_job(cfg, model=args.model, input=args.input, output=args.output)
    if args.verb == "run":
        from se_ray.run import run_job

        return run_job(
            cfg,
            input=_require(args.input or cfg.input, "--input"),
            output=_require(args.output or cfg.output, "--output"),
        )
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from se_ray.data import InputError
    from se_ray.models import ModelNotFoundError

    try:
        if args.verb == "prepare-models":
            from se_ray.models import BUILTIN_MODELS, prepare_builtin

            for name in BUILTIN_MODELS:
                print(f"{name}: {prepare_builtin(name)}")
            return 0
        cfg = load_config(args.config, args.overrides)
        summary = _dispatch(args, cfg)
    except (ConfigError, InputError, ModelNotFoundError) as e:
        print(f"se-ray {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"se-ray {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if _is_model_load_error(e):
            print(f"se-ray {args.verb}: error: could not load the model: {_first_line(e)}", file=sys.stderr)
            return 1
        raise
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # Ray wraps the actor's traceback: its last line is the underlying error.
    return lines[-1] if lines else type(e).__name__


def _is_model_load_error(e: BaseException) -> bool:
    name = type(e).__name__
    return name in {"RayActorError", "ActorDiedError", "ActorUnavailableError"} or "OSError" in str(e)[:200]


if __name__ == "__main__":
    sys.exit(main())
