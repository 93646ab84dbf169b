"""Progress reporting: log lines at least every interval on steady work, a final line, the
command-line bar and its switch, on a fake clock so the timing is exact."""

from __future__ import annotations

import time

import pytest

from cifar_assets.progress import BAR_ENV, ProgressReporter, bars_enabled, heartbeat


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_before_the_interval_passes_on_steady_work() -> None:
    clock, lines, times = FakeClock(), [], []

    def log(line: str) -> None:
        lines.append(line)
        times.append(clock.now)

    with ProgressReporter(
        "features", 100, unit="image", log=log, interval_s=10.0, bar=False, clock=clock
    ) as progress:
        for _ in range(100):
            clock.now += 0.7  # one update every 0.7 s: 70 s of work
            progress.update()

    gaps = [later - earlier for earlier, later in zip([1000.0, *times], times, strict=False)]
    assert len(lines) == 8  # seven progress lines and the final one
    assert max(gaps) <= 10.0
    assert lines[0] == "features: 14/100 images (14%), 1.4 images/s, about 60 s left"
    assert lines[-1] == "features: 100/100 images in 70 s"


def test_short_work_logs_only_its_final_line_and_errors_none() -> None:
    clock, lines = FakeClock(), []
    with ProgressReporter("scan", 3, log=lines.append, bar=False, clock=clock) as progress:
        for _ in range(3):
            clock.now += 0.5
            progress.update()
    assert lines == ["scan: 3/3 items in 1.5 s"]

    failed: list[str] = []
    with (
        pytest.raises(RuntimeError, match="disk full"),
        ProgressReporter("copy", 10, log=failed.append, bar=False, clock=clock) as progress,
    ):
        progress.update()
        raise RuntimeError("disk full")
    assert failed == []  # no "done" line for work that failed


def test_bar_draws_on_stderr_unless_switched_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(BAR_ENV, raising=False)
    assert bars_enabled()
    with ProgressReporter("epochs", 5, unit="epoch") as progress:
        progress.update(5)
    drawn = capsys.readouterr().err
    assert "epochs:   0%" in drawn and "0/5" in drawn  # drawn, then erased when done

    for off in ("0", "false", "OFF"):
        monkeypatch.setenv(BAR_ENV, off)
        assert not bars_enabled()
        with ProgressReporter("epochs", 5, unit="epoch") as progress:
            progress.update(5)
        assert capsys.readouterr().err == ""


def test_bad_arguments_name_the_reporter() -> None:
    with pytest.raises(ValueError, match=r"ProgressReporter\('x'\): total=-1"):
        ProgressReporter("x", -1)
    with pytest.raises(ValueError, match=r"interval_s=0 must be > 0"):
        ProgressReporter("x", 1, interval_s=0)


def test_heartbeat_logs_while_the_block_runs_and_when_it_is_done() -> None:
    lines: list[str] = []
    with heartbeat("slow call", lines.append, interval_s=0.05):
        time.sleep(0.3)
    running = [line for line in lines if line.startswith("slow call: running for ")]
    assert 2 <= len(running) <= 7, lines
    assert lines[-1].startswith("slow call: done in ")
    count = len(lines)
    time.sleep(0.15)
    assert len(lines) == count  # the helper thread has stopped

    with pytest.raises(RuntimeError, match="boom"), heartbeat("failing", lines.append):
        raise RuntimeError("boom")
    assert not any(line.startswith("failing: done") for line in lines)
    with heartbeat("silent", None):
        pass
