"""`leaf-ray`: distill (the whole recipe), embed (the teacher stage alone), cache verify, eval
(re-evaluate a finished run), and plan (GPUs, time and cache size for a cluster)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import ray
from ray.exceptions import RayTaskError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from leaf_ray.capacity import Cluster, PlanError, parse_cluster, plan_mode, plan_run
from leaf_ray.config import ConfigError, LeafConfig, load_config
from leaf_ray.data.sources import DataError
from leaf_ray.eval.tasks import EvalError
from leaf_ray.inputs import check_inputs
from leaf_ray.models import ModelPinError
from leaf_ray.recipe import distill, evaluate_run
from leaf_ray.report.console import (
    print_capacity,
    print_dry_run,
    print_embedded,
    print_summary,
    print_verify,
)
from leaf_ray.run import RunError, report_folder
from leaf_ray.storage import Location
from leaf_ray.teacher.http import HttpTeacherError
from leaf_ray.teacher.stage import embed, verify_cache
from leaf_ray.train.trainer import TrainingDiverged

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
USER_ERRORS = (
    ConfigError,
    DataError,
    EvalError,
    HttpTeacherError,
    ModelPinError,
    PlanError,
    RunError,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leaf-ray", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("LEAF_RAY_DEBUG") == "1",
        help="on an error, the full traceback rather than one line (or LEAF_RAY_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("distill", help="distill a teacher into a leaf student")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML (default: demo)")
    run.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved plan; run nothing"
    )
    emb = commands.add_parser("embed", help="run the teacher stage alone: fill the vector cache")
    cache = commands.add_parser("cache", help="teacher-vector cache tools")
    check = cache.add_subparsers(dest="action", required=True).add_parser(
        "verify", help="re-read the config's cache: missing or corrupt rows (exit 1), duplicates"
    )
    check.add_argument(
        "--repair",
        action="store_true",
        help="set aside shards that fail their checksum or cannot be read; the next embed or "
        "distill embeds their texts again",
    )
    ev = commands.add_parser("eval", help="evaluate a finished run folder again")
    ev.add_argument(
        "--run", required=True, help="run folder written by distill: a path or s3://, gs:// URI"
    )
    ev.add_argument(
        "--student",
        type=Path,
        help="another checkpoint (a sentence-transformers folder) as the student; the report "
        "goes to <run>/evals/<its folder name>",
    )
    plan = commands.add_parser(
        "plan", help="GPU split, wall time and cache size for a cluster, from measured rates"
    )
    plan.add_argument(
        "--cluster",
        default="1x(1 GPU H100)",
        help="<nodes>x(<gpus> GPU <type>), type A100, H100 or H200 (default: 1x(1 GPU H100))",
    )
    plan.add_argument(
        "--teacher-dim",
        type=_positive,
        help="teacher output size (default: known-teacher table)",
    )
    for sub in (emb, check, plan):
        sub.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML (default: demo)")
    for sub in (run, emb, check, ev, plan):
        sub.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return _run(args)
    except KeyboardInterrupt:
        ray.shutdown()  # the watchdog bounds it
        _stop_watchdog()
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "distill" and args.dry_run:
            cfg = load_config(args.config, args.overrides)
            inputs = check_inputs(cfg)
            print_dry_run(cfg, inputs.rows, inputs.skipped)
            return 0
        if args.command == "plan":
            show_capacity(load_config(args.config, args.overrides), args.cluster, args.teacher_dim)
            return 0
        if args.command == "embed":
            v = embed(load_config(args.config, args.overrides))
            ray.shutdown()
            print_embedded(v.plan.rows, v.plan.distinct, v.embedded, v.cache.root, v.skipped)
            return 0
        if args.command == "cache":
            report, set_aside = verify_cache(load_config(args.config, args.overrides), args.repair)
            ray.shutdown()
            print_verify(report, set_aside)
            return 0 if report.ok else 1
        eval_dir = None
        if args.command == "distill":
            run_dir = distill(load_config(args.config, args.overrides))
        else:
            run_dir = Location.of(args.run)
            student = args.student.resolve() if args.student else None
            evaluate_run(run_dir, args.overrides, student)
            eval_dir = report_folder(run_dir, student)
    except Exception as e:
        if args.debug:
            raise
        cause = root_cause(e)
        if isinstance(cause, USER_ERRORS + (TrainingDiverged,)):
            print(f"leaf-ray: error: {_own_words(cause)}", file=sys.stderr)
            return 2 if isinstance(cause, USER_ERRORS) else 1
        first = str(cause).strip().splitlines()[:1] or [""]
        print(f"leaf-ray: error: {type(cause).__name__}: {first[0]}", file=sys.stderr)
        print("leaf-ray: the full traceback: leaf-ray --debug ...", file=sys.stderr)
        return 1
    ray.shutdown()  # first, so Ray's log stream cannot interleave with the summary
    print_summary(run_dir, eval_dir)
    return 0


INTERRUPTED = "leaf-ray: interrupted; rerun the same command to resume"
INTERRUPT_GRACE_S = 10.0  # for Ray to shut down after Ctrl-C, before the process just exits
_watchdog: list[threading.Timer] = []


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C: a KeyboardInterrupt, which `main` turns into Ray's shutdown and exit 130. Python
    drops one raised inside a finaliser (Ray runs many), so a timer ends the process anyway."""
    timer = threading.Timer(INTERRUPT_GRACE_S, _exit_interrupted)
    timer.daemon = True
    timer.start()
    _watchdog.append(timer)
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)  # the checkpoints and cache are on disk; a local Ray dies with its driver


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number above 0")
    return int(value)


def _stop_watchdog() -> None:
    while _watchdog:
        _watchdog.pop().cancel()


# Ray Data appends its retry advice to the error of every failed map task ("Failed to apply UDF
# transform after 1/1 attempts ..."): for our own errors (bad input), it is not advice.
RAY_RETRY_NOTE = "\nFailed to apply UDF transform after "


def _own_words(error: BaseException) -> str:
    return str(error).split(RAY_RETRY_NOTE, 1)[0]


def root_cause(error: BaseException) -> BaseException:
    """The error a user should read, out of Ray's wrappers: a task's error, a Ray Train worker
    group's first failure, the controller's, and exceptions raised `from` another (not ours:
    their message already says what the cause meant)."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WorkerGroupError) and error.worker_failures:
            error = next(iter(error.worker_failures.values()))
        elif isinstance(error, ControllerError):
            error = error.controller_failure
        elif isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
            error = error.cause
        elif error.__cause__ is not None and not isinstance(error, USER_ERRORS):
            error = error.__cause__
    return error


def show_capacity(cfg: LeafConfig, cluster_spec: str, teacher_dim: int | None) -> None:
    """The config's plan on the cluster, next to one GPU of its type and the other data mode."""
    cluster = parse_cluster(cluster_spec)
    plan = plan_run(cfg, cluster, teacher_dim)
    single = plan_run(cfg, Cluster(1, 1, cluster.gpu), teacher_dim) if cluster.gpus > 1 else None
    other_mode = "streaming" if plan.mode == "cached" else "cached"
    print_capacity(
        plan, cfg.teacher.vector_dtype, single, plan_mode(cfg, cluster, other_mode, teacher_dim)
    )


if __name__ == "__main__":
    sys.exit(main())
