"""The whole pipeline: ``main_job`` with the quickstart config through ``dagster job execute``,
step by step from Dagster's own event log, and the import time of the code location.

The job runs in a subprocess exactly as ``scripts/quickstart.sh`` runs it, with every piece of
state in a temporary folder (CIFAR_VAR_DIR, DAGSTER_HOME with configs/dagster.yaml, a copy of
triton_repo/ without version folders, free Triton ports). Afterwards the run's events are read
from that DAGSTER_HOME. Per step, the events split its time into:

- launch: STEP_WORKER_STARTING -> STEP_START (a new process, imports, loading the code location
  and initialising resources: the multiprocess executor runs each step in its own process);
- load inputs: STEP_START -> the last LOADED_INPUT / STEP_INPUT (the project's IO manager);
- body: that point -> the step's first output or check event (STEP_OUTPUT, ASSET_MATERIALIZATION,
  ASSET_CHECK_EVALUATION): the asset function itself;
- store output and finish: -> STEP_SUCCESS (IO manager writes, materialization and check events).

Dagster's overhead is the run's wall time minus the time covered by asset bodies (the union of
their intervals, since two steps may run at once on the multiprocess executor), so it includes
the project's IO manager; the tables show that part separately.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    PROJECT_ROOT,
    PYTHON,
    Goal,
    Template,
    fmt,
    log,
    main,
    median,
    section_facts,
    table,
)

IMPORT_PROCESSES = 5
STATE_VARIABLES = (
    "CIFAR_VAR_DIR",
    "CIFAR_DATA_DIR",
    "CIFAR_STORAGE_DIR",
    "CIFAR_INCOMING_DIR",
    "CIFAR_CAPTURE_DIR",
    "DAGSTER_HOME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "CIFAR_MODEL_NAME",
    "TRITON_MODEL_REPOSITORY",
    "TRITON_HOST",
    "TRITON_HTTP_PORT",
    "TRITON_GRPC_PORT",
    "TRITON_METRICS_PORT",
    "PROMETHEUS_PORT",
)
BODY_END = ("STEP_OUTPUT", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION", "STEP_FAILURE")
INPUT_EVENTS = ("STEP_START", "LOADED_INPUT", "STEP_INPUT")


def import_seconds(env: dict[str, str]) -> list[dict[str, float]]:
    """Fresh interpreters importing cifar_assets.definitions: the import itself and the whole
    process (interpreter start included), one after the other."""
    code = (
        "import time; began = time.perf_counter(); import cifar_assets.definitions; "
        "print(time.perf_counter() - began)"
    )
    figures = []
    for _ in range(IMPORT_PROCESSES):
        began = time.perf_counter()
        result = subprocess.run(
            [str(PYTHON), "-c", code],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        figures.append(
            {
                "import_s": float(result.stdout.strip().splitlines()[-1]),
                "process_s": time.perf_counter() - began,
            }
        )
    return figures


def job_environment(base: Path) -> dict[str, str]:
    from cifar_assets.serving.launcher import copy_repository, free_ports

    var = base / "var"
    home = var / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(PROJECT_ROOT / "configs" / "dagster.yaml", home / "dagster.yaml")
    repo = copy_repository(base / "triton_repo", PROJECT_ROOT / "triton_repo")
    http, grpc, metrics = free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in STATE_VARIABLES}
    env.update(
        {
            "CIFAR_VAR_DIR": str(var),
            "DAGSTER_HOME": str(home),
            "TRITON_MODEL_REPOSITORY": str(repo),
            "TRITON_HTTP_PORT": str(http),
            "TRITON_GRPC_PORT": str(grpc),
            "TRITON_METRICS_PORT": str(metrics),
            "PATH": f"{PYTHON.parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def quick_config(base: Path) -> Path:
    """The quickstart's data ops, shrunk: the smoke run executes data_job (main_job takes
    minutes whatever its size: each of its 14 steps starts a process of its own)."""
    import yaml

    config = yaml.safe_load((PROJECT_ROOT / "configs" / "quickstart.yaml").read_text())
    ops = {name: config["ops"][name] for name in ("cifar10_raw", "cifar10_splits")}
    ops["cifar10_raw"]["config"]["num_images"] = 1000
    path = base / "quick.yaml"
    path.write_text(yaml.safe_dump({"ops": ops}))
    return path


def step_timings(home: Path) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """(run summary, per-step phases in seconds) from the run's event log."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        if len(runs) != 1:
            raise RuntimeError(f"expected one run in {home}, found {len(runs)}")
        run = runs[0]
        events = [
            (entry.timestamp, entry.step_key, entry.dagster_event.event_type_value)
            for entry in instance.all_logs(run.run_id)
            if entry.dagster_event is not None
        ]
    events.sort(key=lambda event: event[0])
    run_events = {kind: stamp for stamp, key, kind in events if key is None}
    # Dagster 1.13 still writes the run's events under their old PIPELINE_* names.
    run_start = next(
        (run_events[k] for k in ("PIPELINE_START", "RUN_START") if k in run_events), events[0][0]
    )
    run_end = next(
        (
            run_events[k]
            for k in ("PIPELINE_SUCCESS", "RUN_SUCCESS", "PIPELINE_FAILURE", "RUN_FAILURE")
            if k in run_events
        ),
        events[-1][0],
    )
    steps: dict[str, dict[str, float]] = {}
    for step in dict.fromkeys(key for _, key, _ in events if key is not None):
        mine = [(stamp, kind) for stamp, key, kind in events if key == step]
        first = {kind: stamp for stamp, kind in reversed(mine)}
        if "STEP_START" not in first:
            continue
        start = first["STEP_START"]
        end_stamp = first.get("STEP_SUCCESS", first.get("STEP_FAILURE", mine[-1][0]))
        body_end = min((s for s, k in mine if k in BODY_END and s >= start), default=end_stamp)
        body_start = max(s for s, k in mine if k in INPUT_EVENTS and s <= body_end)
        launch_start = first.get("STEP_WORKER_STARTING", start)
        steps[step] = {
            "launch_s": start - launch_start,
            "load_inputs_s": body_start - start,
            "body_s": body_end - body_start,
            "store_and_finish_s": end_stamp - body_end,
            "step_s": end_stamp - start,
            "body_start": body_start - run_start,
            "body_end": body_end - run_start,
            "launch_start": launch_start - run_start,
            "succeeded": float("STEP_SUCCESS" in first),
        }
    summary = {
        "run_id": run.run_id,
        "status": str(run.status.value),
        "run_seconds": run_end - run_start,
        "events": [(round(stamp - run_start, 3), key, kind) for stamp, key, kind in events],
        "steps_in_parallel_max": _max_overlap(
            [
                (s["launch_start"], s["launch_start"] + s["launch_s"] + s["step_s"])
                for s in steps.values()
            ]
        ),
    }
    return summary, steps


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    current = best = 0
    for _, change in edges:
        current += change
        best = max(best, current)
    return best


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def run(quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(PROJECT_ROOT))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        base = Path(scratch)
        env = job_environment(base)
        log(f"import time of cifar_assets.definitions, {IMPORT_PROCESSES} fresh processes")
        imports = import_seconds(env)
        config = quick_config(base) if quick else PROJECT_ROOT / "configs" / "quickstart.yaml"
        job = "data_job" if quick else "main_job"
        command = [
            str(PROJECT_ROOT / "scripts" / "dagster"),
            "job",
            "execute",
            "-m",
            "cifar_assets.definitions",
            "-j",
            job,
            "-c",
            str(config),
        ]
        log(f"running {job} ({config.name})")
        began = time.perf_counter()
        result = subprocess.run(
            command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1200
        )
        wall = time.perf_counter() - began
        log(f"{job} exited {result.returncode} after {wall:.0f} s")
        try:
            summary, steps = step_timings(Path(env["DAGSTER_HOME"]))
        finally:
            triton_stopped = _stop_triton(env)
        # A failed run is still measured up to its failure; the report shows the error.
        error = None
        if result.returncode != 0:
            error = (result.stdout[-2000:] + "\n" + result.stderr[-2000:]).strip()
            log(f"{job} FAILED:\n{error}")
    bodies = [(s["body_start"], s["body_end"]) for s in steps.values()]
    body_union = _union_seconds(bodies)
    body_sum = sum(s["body_s"] for s in steps.values())
    io_sum = sum(s["load_inputs_s"] + s["store_and_finish_s"] for s in steps.values())
    launch_sum = sum(s["launch_s"] for s in steps.values())
    return {
        "parameters": {
            "command": f"scripts/dagster job execute -m cifar_assets.definitions -j {job} -c "
            + ("<quickstart's data ops, 1000 images>" if quick else "configs/quickstart.yaml"),
            "job": job,
            "import_processes": IMPORT_PROCESSES,
        },
        "import": {
            "runs": imports,
            "median_import_s": median([f["import_s"] for f in imports]),
            "median_process_s": median([f["process_s"] for f in imports]),
        },
        "job": {
            "cli_wall_s": wall,
            **summary,
            "body_sum_s": body_sum,
            "body_union_s": body_union,
            "launch_sum_s": launch_sum,
            "io_and_events_sum_s": io_sum,
            "dagster_overhead_s": summary["run_seconds"] - body_union,
            "dagster_overhead_cli_s": wall - body_union,
            "exit_code": result.returncode,
            "triton_stopped_after": triton_stopped,
            "error": error,
        },
        "steps": steps,
    }


def _stop_triton(env: dict[str, str]) -> bool:
    """Stop the server the job's deployment step started, reading its pid file under env."""
    from cifar_assets.serving.launcher import TritonConfig, stop_server

    saved = {k: os.environ.get(k) for k in STATE_VARIABLES}
    os.environ.update({k: v for k, v in env.items() if k in STATE_VARIABLES})
    try:
        stopped = stop_server(TritonConfig.from_settings())
        log(f"tritonserver of the job {'stopped' if stopped else 'was not running'}")
        return stopped
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def render(section: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    template = Template("pipeline")
    job, imports = section["job"], section["import"]
    rows = [
        (
            step,
            fmt(s["launch_s"]),
            fmt(s["load_inputs_s"], 2),
            f"**{fmt(s['body_s'])}**",
            fmt(s["store_and_finish_s"], 2),
            fmt(s["launch_s"] + s["step_s"]),
        )
        for step, s in sorted(section["steps"].items(), key=lambda item: item[1]["launch_start"])
    ]
    overhead = job["dagster_overhead_s"]
    failure = []
    if job["error"]:
        failure = template.lines(
            "failure",
            exit_code=str(job["exit_code"]),
            error=job["error"].splitlines()[-25:],
        )
    return template.lines(
        "section",
        job=section["parameters"]["job"],
        command=section["parameters"]["command"],
        triton_stop=template.text("triton_stopped" if job["triton_stopped_after"] else "no_triton"),
        failure=failure,
        overview_table=table(
            ["", "seconds"],
            [
                ("`dagster job execute` process, wall", fmt(job["cli_wall_s"])),
                ("run, start -> success (event log)", fmt(job["run_seconds"])),
                ("asset bodies, sum", fmt(job["body_sum_s"])),
                ("asset bodies, union of intervals", fmt(job["body_union_s"])),
                (
                    "**Dagster overhead** = run wall - body union",
                    f"**{fmt(overhead)}** ({100 * overhead / job['run_seconds']:.0f}% of the run)",
                ),
                (
                    "  of which step launch (process + code location + resources), sum",
                    fmt(job["launch_sum_s"]),
                ),
                (
                    "  of which IO manager + event writes inside steps, sum",
                    fmt(job["io_and_events_sum_s"]),
                ),
                (
                    "same overhead counted from the CLI's wall time",
                    fmt(job["dagster_overhead_cli_s"]),
                ),
                (
                    f"import cifar_assets.definitions (median of {section['parameters']['import_processes']} fresh processes)",
                    fmt(imports["median_import_s"], 2),
                ),
                ("  whole `python -c` process (median)", fmt(imports["median_process_s"], 2)),
            ],
        ),
        run_id=job["run_id"][:8],
        status=job["status"],
        steps_in_parallel=str(job["steps_in_parallel_max"]),
        steps_table=table(
            ["step", "launch", "load inputs", "body", "store + finish", "total"],
            rows,
        ),
        import_seconds=", ".join(f"{f['import_s']:.2f}" for f in imports["runs"]),
        facts=section_facts(section),
    )


def goals(section: dict[str, Any]) -> list[Goal]:
    job, name = section["job"], section["parameters"]["job"]
    return [
        Goal(f"{name} wall time", "-", f"{job['cli_wall_s']:.0f} s", None),
        Goal(
            f"Dagster overhead in {name}",
            "-",
            f"{job['dagster_overhead_s']:.0f} s of {job['run_seconds']:.0f} s",
            None,
        ),
        Goal(
            "import cifar_assets.definitions (median)",
            "-",
            f"{section['import']['median_import_s']:.2f} s",
            None,
        ),
    ]


if __name__ == "__main__":
    main("pipeline", run)
