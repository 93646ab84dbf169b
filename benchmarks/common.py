"""Shared pieces of the benchmark suite: machine and package facts, statistics, interleaving, and
the small protocol every ``bench_*.py`` follows.

Each benchmark module defines ``run(quick: bool) -> dict`` (the raw figures of its section),
``render(section, sections) -> list[str]`` (its Markdown section of the report) and
``goals(section) -> list[Goal]`` (its rows of the summary table). Run on its own, a module
measures its section and writes the JSON to ``--out``; ``run_all.py`` starts one such process per
section, so each section begins with a fresh interpreter (no warm caches, no threads left over).
Only the standard library is imported here: the report is rendered without torch.

The report's prose lives in ``templates/<name>.md``, one file per section (and ``report.md`` for
the frame, ``facts.md`` for the lines every section ends with); a ``render`` computes the tables
and the figures and fills them in with ``Template``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = BENCH_DIR / "templates"
PYTHON = PROJECT_ROOT / ".venv" / "bin" / "python"
# The figures are taken on a 2-core machine; every torch/ORT computation is pinned to this count
# so that a run on a bigger machine measures the same thing unless asked otherwise.
THREADS = 2

PACKAGES = (
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "numpy",
    "dagster",
    "mlflow",
    "alibi-detect",
    "tritonclient",
    "nvidia-pytriton",
)


@dataclass(frozen=True)
class Goal:
    """One row of the report's summary table."""

    name: str
    target: str  # e.g. ">= 0.95"; "-" for a figure reported without a goal
    measured: str
    met: bool | None  # None: no goal, or not measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"})
    return []


def cpu_mhz() -> float | None:
    """The clock /proc/cpuinfo reports (a VM reports its nominal clock, not the boost)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":", 1)[1])
    return None


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict[str, Any]:
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "simd_flags": cpu_flags(),
        "cpu_mhz": cpu_mhz(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def interleave(
    runs: dict[str, Callable[[], float]], repeats: int, log: Callable[[str], None] | None = None
) -> tuple[dict[str, list[float]], list[float]]:
    """Call each run in turn (A, B, A, B, ...) ``repeats`` times; returns every figure by name,
    and the 1-minute load average at the start of each call (in call order).

    Alternating spreads a burst of load from other users over all contenders instead of letting
    it land on one, which is what makes a ratio measured on a shared machine mean something.
    """
    figures: dict[str, list[float]] = {name: [] for name in runs}
    loads: list[float] = []
    for repeat in range(repeats):
        for name, measure in runs.items():
            loads.append(load_average()[0])
            value = measure()
            figures[name].append(value)
            if log is not None:
                log(f"  repeat {repeat + 1}/{repeats} {name}: {value:.2f} (load {loads[-1]})")
    return figures, loads


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def set_torch_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def section_command(name: str) -> str:
    return f".venv/bin/python benchmarks/run_all.py --only {name}"


def measure_section(
    name: str, run: Callable[[bool], dict[str, Any]], quick: bool
) -> dict[str, Any]:
    """Run one section and wrap its figures with the facts every section carries."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = load_average()
    began = time.perf_counter()
    figures = run(quick)
    return {
        "section": name,
        "quick": quick,
        "command": section_command(name) + (" --quick" if quick else ""),
        "started_at": started_at,
        "seconds": round(time.perf_counter() - began, 1),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "machine": machine(),
        "packages": package_versions(),
        **figures,
    }


def main(name: str, run: Callable[[bool], dict[str, Any]]) -> None:
    """Command line of a single benchmark module: ``--quick`` and ``--out FILE``."""
    parser = argparse.ArgumentParser(description=f"The {name} benchmark of the report.")
    parser.add_argument("--quick", action="store_true", help="a much smaller smoke run")
    parser.add_argument("--out", type=Path, help="write the section's JSON here")
    args = parser.parse_args()
    section = measure_section(name, run, args.quick)
    text = json.dumps(section, indent=2, default=_json_default)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# Markdown helpers shared by the render functions.


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


# The report's prose: Markdown templates with named blocks and string.Template placeholders.

_BLOCK_MARKER = re.compile(r"<!-- block: (\w+) -->")
_ALONE = re.compile(r"\$\{(\w+)\}")


@cache
def _blocks(name: str) -> dict[str, tuple[str, ...]]:
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate((TEMPLATE_DIR / f"{name}.md").read_text().splitlines(), 1):
        marker = _BLOCK_MARKER.fullmatch(line)
        if marker:
            current = blocks.setdefault(marker[1], [])
            continue
        if current is None:
            if line.strip():
                raise ValueError(f"templates/{name}.md:{number}: text before the first block")
            continue
        current.append(line)
    for lines in blocks.values():
        while lines and not lines[-1]:  # the blank lines before the next marker separate blocks
            lines.pop()
    return {block: tuple(lines) for block, lines in blocks.items()}


class Template:
    """The prose of one part of the report: ``benchmarks/templates/<name>.md``.

    The file is a run of blocks, each opened by a line ``<!-- block: NAME -->`` and running to
    the next one (the blank lines before that marker left out). A block's lines are the report's
    lines, with ``string.Template`` placeholders (``${name}``; ``$$`` is a dollar sign) for what
    Python computes. A placeholder standing alone on its line may be given a list of lines (a
    table, a list, another block): they replace that line, and an empty list removes it together
    with the blank line after it, so a part that was not measured leaves no gap. Any other
    placeholder takes a string. Every placeholder must be given a value and every value used.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.blocks = _blocks(name)

    def lines(self, block: str, /, **values: str | list[str]) -> list[str]:
        """The block's lines, its placeholders filled in."""
        where = f"templates/{self.name}.md, block {block}"
        if block not in self.blocks:
            raise KeyError(f"templates/{self.name}.md has no block {block!r}")
        texts = {key: value for key, value in values.items() if isinstance(value, str)}
        used: set[str] = set()
        out: list[str] = []
        drop_blank = False
        for line in self.blocks[block]:
            if drop_blank and not line:
                drop_blank = False
                continue
            drop_blank = False
            alone = _ALONE.fullmatch(line)
            if alone and isinstance(values.get(alone[1]), list):
                inserted = values[alone[1]]
                out += inserted
                used.add(alone[1])
                drop_blank = not inserted
                continue
            text = string.Template(line)
            names = set(text.get_identifiers())
            lists = sorted(n for n in names if n in values and n not in texts)
            if lists:
                raise TypeError(f"{where}: {lists} take lines but stand inside a line")
            try:
                out.append(text.substitute(texts))
            except KeyError as missing:
                raise KeyError(f"{where}: no value for ${{{missing.args[0]}}}") from None
            used |= names
        unused = sorted(set(values) - used)
        if unused:
            raise KeyError(f"{where}: no placeholder for {unused}")
        return out

    def text(self, block: str, /, **values: str | list[str]) -> str:
        """A one-line block as a string, to go inside another block's line."""
        lines = self.lines(block, **values)
        if len(lines) != 1:
            raise ValueError(f"templates/{self.name}.md, block {block}: {len(lines)} lines, not 1")
        return lines[0]


def blocks_apart(blocks: Sequence[list[str]]) -> list[str]:
    """The blocks one after the other, a blank line between each two."""
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        lines += block
    return lines


def machine_fields(machine_facts: dict[str, Any]) -> dict[str, str]:
    """The machine's facts as the templates' placeholders (report header and section facts)."""
    return {
        "cpu_model": machine_facts["cpu_model"],
        "usable_cpus": str(machine_facts["usable_cpus"]),
        "logical_cpus": str(machine_facts["logical_cpus"]),
        "simd_flags": ", ".join(machine_facts["simd_flags"]),
        "memory_gib": str(machine_facts["memory_gib"]),
    }


def section_facts(section: dict[str, Any]) -> list[str]:
    """The lines every section ends with: how to reproduce it and under which conditions."""
    machine_facts = section["machine"]
    return Template("facts").lines(
        "facts",
        command=section["command"],
        **machine_fields(machine_facts),
        python=machine_facts["python"],
        packages=", ".join(f"{k} {v}" for k, v in section["packages"].items()),
        started_at=section["started_at"],
        seconds=f"{section['seconds']:.0f}",
        load_start=str(section["load_average_start"]),
        load_end=str(section["load_average_end"]),
    )
