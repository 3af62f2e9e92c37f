"""The `se-ray` command: one verb per job function (label, train, evaluate, run).

The contract every verb keeps: stdout holds exactly its JSON summary (everything else,
Ray's forwarded worker logs included, goes to stderr); an error is one line on stderr's
last line and a non-zero exit; SIGINT and SIGTERM end the verb within 15 s with one line
and exit 130 / 143, keeping committed parts. A verb that writes an output takes the lease
on it first, so a second copy of the same job refuses instead of duplicating rows.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import signal
import sys
import traceback
from typing import Any

from se_ray.config import ConfigError, JobConfig, load_config
from se_ray.console import (
    Interrupted,
    SummaryOutput,
    arm_watchdog,
    install_signal_handlers,
    interrupted_message,
    received_signal,
    write_line_once,
)

SUMMARY_FILE = "summary.json"  # every verb writes its closing summary beside its output

logger = logging.getLogger("se_ray")

EXIT_ERROR = 1  # an unexpected failure (a bug, a crashed engine)
EXIT_USAGE = 2  # bad input, config or output: fix the command and rerun


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
    p.add_argument(
        "--force",
        action="store_true",
        help="take the output's lease even from a live run (default: refuse while its heartbeat is fresh)",
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
    p.add_argument(
        "--abstain-by",
        choices=["semantic_entropy"],
        help="the teacher: sample the model, abstain where semantic entropy > tau, else answer",
    )
    p.add_argument("--tau", type=float, help="threshold for --abstain-by (default: labeling.tau)")
    _common(p)

    p = verbs.add_parser("run", help="the whole job: split, label, train SE + baselines, evaluate, report")
    p.add_argument("--input", help="questions (default: the config's input)")
    p.add_argument("--output", help="output folder (default: the config's output)")
    _common(p)

    p = verbs.add_parser("prepare-models", help="prepare the built-in offline models into the cache")
    p.add_argument("names", nargs="*", help="built-in models (default: those set-up installs)")
    _plan_parser(verbs)
    _engines_parser(verbs)
    return parser


def _engines_parser(verbs: Any) -> None:
    p = verbs.add_parser(
        "engines", help="start, list or stop shared vLLM engines (detached; for ray.shared_engines=true)"
    )
    p.add_argument("action", choices=["start", "list", "stop"])
    p.add_argument(
        "--verb",
        dest="engine_verb",
        choices=["run", "label", "evaluate"],
        default="run",
        help="whose engines: run (LoRA serving when it trains adapters), label or evaluate (default: run)",
    )
    p.add_argument("--all", action="store_true", help="stop: every se-ray engine in ray.namespace")
    p.add_argument("--config", help="YAML job config (default: the built-in CPU quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _engines(args: argparse.Namespace) -> dict[str, Any]:
    from se_ray import engine_admin

    cfg = load_config(args.config, args.overrides)
    if args.action == "start":
        return engine_admin.start_engines(cfg, args.engine_verb)
    if args.action == "stop":
        return engine_admin.stop_engines(cfg, args.engine_verb, every=args.all)
    return engine_admin.list_engines(cfg)


def _plan_parser(verbs: Any) -> None:
    p = verbs.add_parser("plan", help="the job's actor groups, the nodes Ray would put them on, GPU-hours")
    p.add_argument(
        "--cluster", help="a `ray up` config or a KubeRay RayCluster/RayJob manifest (cluster/...)"
    )
    p.add_argument(
        "--verb",
        dest="planned_verb",
        choices=["run", "label", "train", "evaluate"],
        help="the verb to plan (default: the one the config's first line runs, else run)",
    )
    p.add_argument("--questions", type=int, help="input size for label/train/evaluate GPU-hours")
    p.add_argument("--reserve", action="store_true", help="ask the live cluster (ray.address) for it")
    p.add_argument("--reserve-timeout", type=float, default=60.0, help="seconds to wait per phase")
    p.add_argument("--config", help="YAML job config (default: the built-in CPU quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    from se_ray.resources.verb import plan_job

    return plan_job(
        load_config(args.config, args.overrides),
        config_path=args.config,
        cluster_file=args.cluster,
        verb=args.planned_verb,
        questions=args.questions,
        do_reserve=args.reserve,
        reserve_timeout_s=args.reserve_timeout,
    )


def _require(value: str | None, what: str) -> str:
    if not value:
        raise ConfigError(f"{what} is required (flag or config key)")
    return value


def _output(args: argparse.Namespace, cfg: JobConfig) -> str:
    if args.verb in ("label", "run"):
        return _require(args.output or cfg.output, "--output")
    return _require(args.output, "--output")


def _dispatch(args: argparse.Namespace, cfg: JobConfig, output: str) -> dict[str, Any]:
    if args.verb == "label":
        from se_ray.label import label_job

        return label_job(cfg, _require(args.input or cfg.input, "--input"), output)
    if args.verb == "train":
        from se_ray.train import train_job

        return train_job(cfg, labels=args.labels, output=output, resume=args.resume)
    if args.verb == "evaluate":
        from se_ray.evaluate import evaluate_job

        return evaluate_job(
            cfg, model=args.model, input=args.input, output=output, abstain_by=args.abstain_by, tau=args.tau
        )
    if args.verb == "run":
        from se_ray.run import run_job

        return run_job(cfg, input=_require(args.input or cfg.input, "--input"), output=output)
    raise AssertionError(args.verb)


def _prepare_models(names: list[str]) -> dict[str, Any]:
    from se_ray.models import BUILTIN_PREFIX, DEFAULT_BUILTIN_MODELS, resolve_model

    names = [n.removeprefix(BUILTIN_PREFIX) for n in names] or list(DEFAULT_BUILTIN_MODELS)
    return {"models": {name: resolve_model(BUILTIN_PREFIX + name) for name in names}}


def _run_verb(args: argparse.Namespace) -> dict[str, Any]:
    from se_ray.lease import OutputLease, check_output_location
    from se_ray.storage import Store

    if args.verb == "prepare-models":
        return _prepare_models(args.names)
    if args.verb == "plan":
        return _plan(args)
    if args.verb == "engines":
        return _engines(args)
    cfg = load_config(args.config, args.overrides)
    output = _output(args, cfg)
    # Cheap checks first: a bad output or labels folder fails in a second, before Ray starts.
    check_output_location(output, cfg.storage)
    if args.verb == "train":
        from se_ray.data import check_labels_folder

        check_labels_folder(args.labels, cfg.storage)
    command = " ".join(["se-ray", *sys.argv[1:]])[:500]
    with OutputLease(
        output, cfg.storage, stale_s=cfg.storage.lease_stale_s, force=args.force, command=command
    ):
        summary = strict_json(_dispatch(args, cfg, output))
        Store(output, cfg.storage).write_json(SUMMARY_FILE, summary)  # under the lease, checked
    return summary


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities as null: the summary must parse as strict JSON (RFC 8259),
    and an AUROC without both classes, or an interval without resamples, is NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def _known_errors() -> tuple[type[BaseException], ...]:
    from se_ray.data import InputError
    from se_ray.lease import LeaseHeldError, LeaseLostError, OutputError
    from se_ray.models import ModelNotFoundError

    return (
        ConfigError,
        InputError,
        ModelNotFoundError,
        OutputError,
        LeaseHeldError,
        LeaseLostError,
        FileExistsError,
        FileNotFoundError,
    )


def main(argv: list[str] | None = None, *, restore_stdout: bool = False) -> int:
    """Entry point. ``restore_stdout`` gives fd 1 back at the end (for in-process callers)."""
    args = build_parser().parse_args(argv)  # --help and usage errors print before the redirect
    prog = f"se-ray {args.verb}"
    install_signal_handlers(prog)
    with SummaryOutput(restore=restore_stdout) as out:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
        code, summary = _main(args, prog)
        if summary is not None:
            out.emit(summary)
    return code


def _main(args: argparse.Namespace, prog: str) -> tuple[int, dict[str, Any] | None]:
    try:
        return 0, _run_verb(args)
    except Interrupted as e:
        _end(prog, interrupted_message(e.signum))
        return e.exit_code, None
    except SystemExit as e:
        # ray.init replaces the SIGTERM handler with sys.exit(15) unless our handler was put
        # back after it: the same signal, so the same ending.
        if e.code == signal.SIGTERM and received_signal() is None:
            arm_watchdog(signal.SIGTERM)
            _end(prog, interrupted_message(signal.SIGTERM))
            return 128 + signal.SIGTERM, None
        raise
    except _known_errors() as e:
        _end(prog, f"error: {_message(e)}")
        return EXIT_USAGE, None
    except Exception as e:
        failure = _engine_failure(e)
        if failure is not None:  # an engine's restarts are spent: say which engine and why
            _end(prog, f"error: {failure}")
            return EXIT_ERROR, None
        if _is_model_load_error(e):
            _end(prog, f"error: could not load the model: {_first_line(e)}")
            return EXIT_ERROR, None
        # A bug or an unforeseen failure: the traceback helps, the last line still says what.
        traceback.print_exc(file=sys.stderr)
        _end(prog, f"error: {type(e).__name__}: {_first_line(e)}")
        return EXIT_ERROR, None


def _end(prog: str, message: str) -> None:
    """Write the closing line as stderr's last: stop Ray first, whose log forwarding would
    otherwise print the released actors' last words after it."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        with contextlib.suppress(Exception):
            ray.shutdown()
    write_line_once(f"{prog}: {message}")


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError | FileNotFoundError | FileExistsError) and not str(e).strip("'\""):
        return type(e).__name__
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # Ray wraps the actor's traceback: its last line is the underlying error.
    return lines[-1] if lines else type(e).__name__


def _engine_failure(e: BaseException) -> str | None:
    """The message of the ``EngineFailedError`` behind ``e``, if any: Ray Data wraps an error of
    the sample stage in its own (``UserCodeException``, whose last line is retry advice)."""
    from se_ray.engine_actor import EngineFailedError

    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, EngineFailedError):
            return " ".join(str(x).split())
        causes = (x.__cause__, x.__context__, getattr(x, "cause", None))  # RayTaskError.cause
        todo += [c for c in causes if isinstance(c, BaseException)]
    found = re.search(r"EngineFailedError: (engine .+)", str(e))  # a cause that crossed processes as text
    return found.group(1).strip() if found else None


def _is_model_load_error(e: BaseException) -> bool:
    name = type(e).__name__
    return name in {"RayActorError", "ActorDiedError", "ActorUnavailableError"} or "OSError" in str(e)[:200]


if __name__ == "__main__":
    sys.exit(main())
