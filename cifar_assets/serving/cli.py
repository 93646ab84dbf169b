"""``cifar-triton``: start, stop and inspect the local Triton server, and steer its traffic.

    cifar-triton start [--http-port P --grpc-port P --metrics-port P --repo DIR] [--foreground]
    cifar-triton stop | status
    cifar-triton live 3 4            serve exactly versions 3 and 4 of cifar10_resnet18
    cifar-triton weights 3=0.9 4=0.1 split the A/B router's traffic
    cifar-triton router bls          how the router runs versions (inprocess | bls); kept
    cifar-triton native [--out DIR] [VERSION ...]  copy for the NGC onnxruntime backend

Defaults come from ``cifar_assets.settings`` (TRITON_* variables, CIFAR_VAR_DIR); ``stop`` and
``status`` find the server through the pid file under ``CIFAR_VAR_DIR/triton``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from cifar_assets.serving import repository
from cifar_assets.serving.launcher import (
    Orphans,
    TritonConfig,
    TritonLaunchError,
    TritonServer,
    server_status,
    stop_and_clean,
)
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
    live = commands.add_parser("live", help="set the live versions of cifar10_resnet18")
    live.add_argument("versions", type=int, nargs="+")
    weights = commands.add_parser("weights", help="set the A/B weights, e.g. 3=0.9 4=0.1")
    weights.add_argument("shares", nargs="+", metavar="VERSION=WEIGHT")
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


def _parse_shares(shares: list[str]) -> dict[int, float]:
    weights: dict[int, float] = {}
    for share in shares:
        version, _, weight = share.partition("=")
        try:
            weights[int(version)] = float(weight)
        except ValueError:
            raise repository.RepositoryError(
                f"{share!r} is not VERSION=WEIGHT; write e.g. `cifar-triton weights 3=0.9 4=0.1`."
            ) from None
    return weights


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
    print(f"  live versions {status.live_versions or 'none (cifar-triton live N)'}")
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
        if args.command in ("live", "weights", "router"):
            config = TritonConfig.from_settings()
            if args.command in ("live", "router"):
                record = server_status(config)
                if not record.running or record.http_url is None:
                    raise TritonLaunchError(
                        f"No tritonserver is running for {config.state_dir}; start it first "
                        "with `cifar-triton start`."
                    )
            if args.command == "router":
                repository.load_router(
                    record.http_url,
                    repo=Path(record.repo or config.repo),
                    state_dir=config.state_dir,
                    capture_dir=config.capture_dir,
                    capture_input_sample_rate=config.capture_input_sample_rate,
                    execution=args.execution,
                )
                print(f"router execution: {args.execution}")
            elif args.command == "live":
                versions = repository.set_live_versions(
                    record.http_url,
                    args.versions,
                    repo=Path(record.repo or config.repo),
                    state_dir=config.state_dir,
                )
                print(f"live versions: {versions}")
            else:
                weights = repository.set_ab_weights(
                    _parse_shares(args.shares), state_dir=config.state_dir
                )
                print(f"A/B weights: {weights}")
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
        print(json.dumps(asdict(server_status(config)), indent=2))
        return 0
    except (TritonLaunchError, repository.RepositoryError) as exc:
        print(f"cifar-triton {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
