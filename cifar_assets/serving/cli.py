"""``cifar-triton``: start, stop and inspect the local Triton server, and move the model's
lifecycle through the rollout (cifar_assets.serving.rollout), never around it.

    cifar-triton start [--http-port P --grpc-port P --metrics-port P --repo DIR] [--foreground]
    cifar-triton stop | status       status: the server, and the lifecycle with any disagreement
                                     between MLflow, the router, Triton and the journal
    cifar-triton promote 3 --reason "..."   make v3 champion (it must have passed its check)
    cifar-triton rollback --reason "..."    the previous champion comes back
    cifar-triton retire 4 --reason "..."    the challenger v4 leaves the aliases and serving
    cifar-triton step --reason "..."        advance a staged rollout by one stage
    cifar-triton reconcile                  finish a crashed transition, or follow MLflow
    cifar-triton router bls          how the router runs versions (inprocess | bls); kept
    cifar-triton native [--out DIR] [VERSION ...]  copy for the NGC onnxruntime backend

Defaults come from ``cifar_assets.settings`` (TRITON_* variables, CIFAR_VAR_DIR); ``stop`` and
``status`` find the server through the pid file under ``CIFAR_VAR_DIR/triton``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from cifar_assets.ml.registry import Registry
from cifar_assets.serving import repository
from cifar_assets.serving.launcher import (
    Orphans,
    TritonConfig,
    TritonLaunchError,
    TritonServer,
    server_status,
    stop_and_clean,
)
from cifar_assets.serving.rollout import Rollout, RolloutError, Transition
from cifar_assets.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-triton", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start tritonserver in the background")
    for sub in (start, commands.add_parser("stop"), commands.add_parser("status")):
        sub.add_argument("--http-port", type=int, help="default TRITON_HTTP_PORT or 8000")
        sub.add_argument("--grpc-port", type=int, help="default TRITON_GRPC_PORT or 8001")
        sub.add_argument("--metrics-port", type=int, help="default TRITON_METRICS_PORT or 8002")
        sub.add_argument("--repo", type=Path, help="default TRITON_MODEL_REPOSITORY")
    start.add_argument(
        "--foreground", action="store_true", help="stay attached; stop on Ctrl-C or SIGTERM"
    )
    start.add_argument("--ready-timeout", type=float, default=120.0, help="seconds (120)")
    for name, help_text in LIFECYCLE_COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        if name in ("promote", "retire"):
            command.add_argument("version", type=int)
        if name != "reconcile":
            command.add_argument("--reason", required=True, help="kept in the journal")
    router = commands.add_parser(
        "router", help="reload the A/B router in another execution mode (kept across restarts)"
    )
    router.add_argument("execution", choices=repository.ROUTER_EXECUTION_MODES)
    native = commands.add_parser("native", help="write the repository for the NGC container")
    native.add_argument("versions", type=int, nargs="*", help="default: every written version")
    native.add_argument("--out", type=Path, help="default CIFAR_VAR_DIR/triton_native_repo")
    return parser


def _config(args: argparse.Namespace) -> TritonConfig:
    overrides = {
        key: value
        for key, value in {
            "http_port": getattr(args, "http_port", None),
            "grpc_port": getattr(args, "grpc_port", None),
            "metrics_port": getattr(args, "metrics_port", None),
            "repo": args.repo.resolve() if getattr(args, "repo", None) else None,
            "ready_timeout_s": getattr(args, "ready_timeout", None),
        }.items()
        if value is not None
    }
    return TritonConfig.from_settings(**overrides)


LIFECYCLE_COMMANDS = {
    "promote": "make a version champion, with the champion's traffic",
    "rollback": "give the champion alias and traffic back to the previous champion",
    "retire": "take a challenger out of the aliases and out of serving",
    "step": "advance the staged rollout by one stage",
    "reconcile": "finish a transition a crash left, or bring serving to MLflow's aliases",
}


def _rollout(config: TritonConfig) -> Rollout:
    settings = get_settings()
    return Rollout(
        models=Registry(settings.mlflow_tracking_uri, settings.registered_model_name),
        triton=config.http_url,
        repo=config.repo,
        state_dir=config.state_dir,
    )


def _lifecycle(args: argparse.Namespace, config: TritonConfig) -> int:
    # Triton's strict readiness drops for a moment while a version unloads (as after the
    # previous transition): wait for it rather than refuse.
    deadline = time.monotonic() + 30
    status = server_status(config)
    while status.running and not status.ready and time.monotonic() < deadline:
        time.sleep(0.5)
        status = server_status(config)
    if not status.ready:
        raise TritonLaunchError(
            f"Triton is not ready at {config.http_url}"
            + (" after 30 s" if status.running else "")
            + "; start it with `cifar-triton start`, or see "
            f"{config.log_path}."
        )
    rollout = _rollout(config)
    actor = f"cifar-triton {args.command} ({getpass.getuser()})"
    transition: Transition | None
    if args.command == "promote":
        transition = rollout.promote(args.version, reason=args.reason, actor=actor)
    elif args.command == "rollback":
        transition = rollout.rollback(reason=args.reason, actor=actor)
    elif args.command == "retire":
        transition = rollout.retire(args.version, reason=args.reason, actor=actor)
    elif args.command == "step":
        transition = rollout.step(reason=args.reason, actor=actor)
    else:
        transition = rollout.reconcile(actor=actor)
    if transition is None:
        print("MLflow, the router and Triton already agree: nothing to do")
    else:
        print(json.dumps({"action": transition.action, "after": transition.after}, indent=2))
    problems = rollout.check(server_ready=rollout.server_ready)
    for problem in problems:
        print(f"disagreement: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _lifecycle_status(config: TritonConfig) -> dict[str, object]:
    """The lifecycle part of ``status``: the state, and every disagreement found."""
    rollout = _rollout(config)
    ready = server_status(config).ready
    try:
        state = rollout.state().to_dict()
        problems = rollout.check(server_ready=rollout.server_ready if ready else None)
    except (RolloutError, OSError, ValueError) as exc:
        return {"error": str(exc)}
    return {**state, "disagreements": problems}


def _print_orphans(orphans: Orphans, config: TritonConfig) -> None:
    if orphans.stubs or orphans.regions:
        print(
            f"removed {len(orphans.stubs)} orphaned python-backend stub(s) {orphans.stubs} and "
            f"{len(orphans.regions)} /dev/shm region(s) left by a killed server on {config.repo}"
        )


def _start(config: TritonConfig, foreground: bool) -> int:
    server = TritonServer(config).start()
    status = server_status(config)
    _print_orphans(server.orphans_removed, config)
    print(f"tritonserver pid {server.pid} ready")
    print(f"  HTTP     {config.http_url}\n  gRPC     {config.grpc_url}")
    print(f"  metrics  {config.metrics_url}\n  log      {config.log_path}")
    print(f"  live versions {status.live_versions or 'none (main_job deploys the champion)'}")
    # A transition that a crash cut short is finished now, before traffic arrives.
    try:
        transition = _rollout(config).reconcile(actor="cifar-triton start")
    except (RolloutError, repository.RepositoryError) as exc:
        print(f"  lifecycle not reconciled: {exc}", file=sys.stderr)
    else:
        if transition is not None:
            print(f"  reconciled: {transition.action} -> {transition.after['weights']}")
    if not foreground:
        return 0

    def stop(signum: int, frame: FrameType | None) -> None:
        server.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return server.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in LIFECYCLE_COMMANDS:
            return _lifecycle(args, TritonConfig.from_settings())
        if args.command == "router":
            config = TritonConfig.from_settings()
            record = server_status(config)
            if not record.running or record.http_url is None:
                raise TritonLaunchError(
                    f"No tritonserver is running for {config.state_dir}; start it first "
                    "with `cifar-triton start`."
                )
            repository.load_router(
                record.http_url,
                repo=Path(record.repo or config.repo),
                state_dir=config.state_dir,
                capture_dir=config.capture_dir,
                capture_input_sample_rate=config.capture_input_sample_rate,
                execution=args.execution,
            )
            print(f"router execution: {args.execution}")
            return 0
        if args.command == "native":
            settings = get_settings()
            out = args.out or settings.var_dir / "triton_native_repo"
            written = repository.write_native_repository(settings.triton_repo, out, args.versions)
            print(f"native onnxruntime repository: {written}")
            return 0
        config = _config(args)
        if args.command == "start":
            return _start(config, args.foreground)
        if args.command == "stop":
            running, orphans = stop_and_clean(config)
            _print_orphans(orphans, config)
            print("stopped" if running else "no tritonserver was running")
            return 0
        status = {**asdict(server_status(config)), "lifecycle": _lifecycle_status(config)}
        print(json.dumps(status, indent=2, default=str))
        return 0
    except (TritonLaunchError, repository.RepositoryError, RolloutError) as exc:
        print(f"cifar-triton {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
