"""Run the benchmark suite and write benchmarks/REPORT.md and benchmarks/results.json.

    .venv/bin/python benchmarks/run_all.py                      # everything (under 20 min)
    .venv/bin/python benchmarks/run_all.py --only serving,drift # some sections, merged into
                                                                # the existing results.json
    .venv/bin/python benchmarks/run_all.py --quick              # smoke run, into a temp folder
    .venv/bin/python benchmarks/run_all.py --render-only        # REPORT.md from results.json

Each section runs in its own fresh process (``bench_<name>.py --out <json>``), one after the
other, so no section inherits another's threads, caches or memory. A section that fails is
recorded with its error and the others still run. The benchmarks print figures; none of them
passes or fails on time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    PROJECT_ROOT,
    PYTHON,
    Template,
    blocks_apart,
    load_average,
    machine,
    machine_fields,
    package_versions,
    table,
)

# Execution order: cheap first, then everything measured on the CPU alone, then the two that
# start servers and subprocesses of their own.
SECTIONS = ("flops", "training", "quantization", "drift", "serving", "pipeline")
REPORT_ORDER = ("training", "serving", "quantization", "drift", "pipeline", "flops")
GPU_JSON = BENCH_DIR / "train_gpu_h200.json"
TIME_LIMIT_S = 20 * 60


def run_section(name: str, quick: bool, scratch: Path) -> dict[str, Any]:
    """Run bench_<name>.py in a fresh process, echoing its progress; returns its JSON, or a
    record of the failure."""
    out = scratch / f"{name}.json"
    command = [str(PYTHON), str(BENCH_DIR / f"bench_{name}.py"), "--out", str(out)]
    if quick:
        command.append("--quick")
    began = time.perf_counter()
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, cwd=PROJECT_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    ) as process:
        assert process.stderr is not None
        for line in process.stderr:
            tail.append(line.rstrip())
            # Library warnings (alibi-detect, onnx exporter) drown the progress lines.
            if "warn" not in line.lower():
                sys.stderr.write(line)
        returncode = process.wait()
    seconds = time.perf_counter() - began
    if returncode == 0 and out.is_file():
        section: dict[str, Any] = json.loads(out.read_text())
        section["process_seconds"] = round(seconds, 1)
        return section
    return {
        "section": name,
        "quick": quick,
        "failed": True,
        "returncode": returncode,
        "process_seconds": round(seconds, 1),
        "error_tail": list(tail),
    }


def render_gpu() -> list[str]:
    if not GPU_JSON.is_file():
        return []
    gpu = json.loads(GPU_JSON.read_text())
    rows = [
        (
            "yes" if probe["config"]["mixed_precision"] else "no",
            "yes" if probe["config"]["compile"] else "no",
            probe["config"]["epochs"],
            f"{probe['wall_seconds']:.1f}",
            f"{probe['images_per_s_per_epoch'][0]:,.0f}",
            f"**{probe['steady_images_per_s']:,.0f}**",
            f"{100 * probe['test_accuracy']:.2f}%",
        )
        for probe in gpu["probes"]
    ]
    full = gpu["full_run"]
    epochs = full["images_per_s_per_epoch"]
    return Template("gpu").lines(
        "section",
        gpu=gpu["machine"]["gpu"],
        torch=gpu["machine"]["torch"],
        python=gpu["machine"]["python"],
        train_images=f"{gpu['data']['train']:,}",
        test_images=f"{gpu['data']['test']:,}",
        table=table(
            [
                "bf16 + channels_last",
                "torch.compile",
                "epochs",
                "wall s",
                "epoch 1 images/s",
                "steady images/s",
                "test accuracy",
            ],
            rows,
        ),
        mixed_precision="on" if full["config"]["mixed_precision"] else "off",
        compile="on" if full["config"]["compile"] else "off",
        epochs=str(full["config"]["epochs"]),
        wall_seconds=f"{full['wall_seconds']:.1f}",
        steady=f"{full['steady_images_per_s']:,.0f}",
        low=f"{min(epochs):,.0f}",
        high=f"{max(epochs):,.0f}",
        accuracy=f"{100 * full['test_accuracy']:.2f}",
    )


def suite_estimate(results: dict[str, Any]) -> float | None:
    """The full run's time with each section re-measured since counted at its new duration;
    None when nothing was re-measured."""
    full_run = results.get("full_run") or {}
    before = full_run.get("section_seconds", {})
    changed = {
        name: section["process_seconds"]
        for name, section in results["sections"].items()
        if name in before and section["process_seconds"] != before[name]
    }
    if not changed:
        return None
    return float(full_run["total_seconds"] + sum(changed[n] - before[n] for n in changed))


def run_lines(template: Template, results: dict[str, Any]) -> list[str]:
    """When and under which load the figures were taken: the full run, and any sections
    re-measured after it with --only."""
    load_note = template.text("load_note")
    full_run = results.get("full_run")
    if not results["partial"] or not full_run:
        return template.lines(
            "run",
            command=results["command"],
            started_at=results["started_at"],
            minutes=f"{results['total_seconds'] / 60:.1f}",
            load_start=str(results["load_average_start"]),
            load_end=str(results["load_average_end"]),
            load_note=load_note,
        )
    before = full_run.get("section_seconds", {})
    redone = [
        name
        for name, section in results["sections"].items()
        if section.get("started_at", "") > full_run["started_at"]
        and section.get("process_seconds") != before.get(name)
    ]
    return template.lines(
        "full_run",
        started_at=full_run["started_at"],
        minutes=f"{full_run['total_seconds'] / 60:.1f}",
        load_start=str(full_run["load_average_start"]),
        load_end=str(full_run["load_average_end"]),
        load_note=load_note,
        redone=", ".join(redone) if redone else template.text("nothing_redone"),
        command=results["command"],
    )


def render(results: dict[str, Any]) -> str:
    template = Template("report")
    sections: dict[str, Any] = {
        name: section for name, section in results["sections"].items() if not section.get("failed")
    }
    goal_rows: list[tuple[str, str, str, str]] = []
    body: list[list[str]] = []
    for name in REPORT_ORDER:
        section = results["sections"].get(name)
        if section is None:
            continue
        if section.get("failed"):
            body.append(
                template.lines(
                    "failed",
                    name=name,
                    returncode=str(section["returncode"]),
                    seconds=f"{section['process_seconds']:.0f}",
                    error_tail=list(section["error_tail"]),
                )
            )
            goal_rows.append((f"{name} section", "runs", "FAILED", "no"))
            continue
        module = importlib.import_module(f"bench_{name}")
        body.append(module.render(section, sections))
        for goal in module.goals(section):
            verdict = {True: "**yes**", False: "**no**", None: "-"}[goal.met]
            goal_rows.append((goal.name, goal.target, goal.measured, verdict))
    full_run = results.get("full_run")
    if full_run:
        within = full_run["total_seconds"] < TIME_LIMIT_S
        measured = f"{full_run['total_seconds'] / 60:.1f} min"
        estimate = suite_estimate(results)
        if estimate is not None:
            within = estimate < TIME_LIMIT_S
            measured += (
                f" (full run); about {estimate / 60:.1f} min with the sections re-measured "
                "since, counted at their new durations"
            )
        goal_rows.insert(
            0,
            (
                "whole suite, one command",
                f"< {TIME_LIMIT_S // 60} min",
                measured,
                "**yes**" if within else "**no**",
            ),
        )
    run_machine = results["machine"]
    quick = any(section.get("quick") for section in results["sections"].values())
    lines = template.lines(
        "report",
        quick_warning=template.text("quick_warning") if quick else "",
        **machine_fields(run_machine),
        kernel=run_machine["kernel"],
        run=run_lines(template, results),
        summary_table=table(["what", "goal", "measured", "met"], goal_rows),
        sections=blocks_apart(body),
        gpu=render_gpu(),
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--only", help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})"
    )
    parser.add_argument("--quick", action="store_true", help="much smaller smoke runs")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where REPORT.md and results.json go (default: benchmarks/, or a temporary "
        "folder with --quick so a smoke run never overwrites the report)",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite REPORT.md from results.json"
    )
    args = parser.parse_args()
    chosen = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(",") if s)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="cifar-bench-quick-")) if args.quick else BENCH_DIR
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path, report_path = out_dir / "results.json", out_dir / "REPORT.md"

    if args.render_only:
        report_path.write_text(render(json.loads(results_path.read_text())))
        print(f"wrote {report_path}")
        return

    previous: dict[str, Any] = {}
    last_full_run = None
    if args.only and results_path.is_file():
        earlier = json.loads(results_path.read_text())
        previous, last_full_run = earlier.get("sections", {}), earlier.get("full_run")
        if last_full_run is not None and "section_seconds" not in last_full_run:
            last_full_run["section_seconds"] = {
                name: section["process_seconds"]
                for name, section in previous.items()
                if section.get("started_at", "") >= last_full_run["started_at"]
            }
    command = (
        ".venv/bin/python benchmarks/run_all.py"
        + (f" --only {','.join(chosen)}" if args.only else "")
        + (" --quick" if args.quick else "")
    )
    results: dict[str, Any] = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "machine": machine(),
        "packages": package_versions(),
        "partial": bool(args.only),
        "sections": {},
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cifar-bench-") as scratch:
        for name in chosen:
            print(f"=== {name} ===", file=sys.stderr, flush=True)
            section = run_section(name, args.quick, Path(scratch))
            status = "FAILED" if section.get("failed") else "done"
            print(
                f"=== {name}: {status} in {section['process_seconds']:.0f} s "
                f"(suite so far {time.perf_counter() - began:.0f} s) ===",
                file=sys.stderr,
                flush=True,
            )
            results["sections"][name] = section
    results["total_seconds"] = round(time.perf_counter() - began, 1)
    results["load_average_end"] = load_average()
    results["full_run"] = (
        last_full_run
        if args.only
        else {
            **{
                key: results[key]
                for key in ("started_at", "total_seconds", "load_average_start", "load_average_end")
            },
            "section_seconds": {
                name: section["process_seconds"] for name, section in results["sections"].items()
            },
        }
    )
    # Sections not run this time keep their last figures (each carries its own date and load).
    results["sections"] = {
        name: results["sections"].get(name) or previous[name]
        for name in SECTIONS
        if name in results["sections"] or name in previous
    }
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    report_path.write_text(render(results))
    print(
        f"wrote {report_path} and {results_path} in {results['total_seconds'] / 60:.1f} min",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
