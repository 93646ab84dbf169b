"""The Dagster and MLflow UIs in a real browser (Debian's chromium, driven by Playwright).

Starts dagster-webserver on a free port with a temporary DAGSTER_HOME, finds the assets in the
lineage graph, launches the data job from the launchpad by clicking, waits for the run to succeed,
then opens the MLflow UI on a store holding a registered model. Screenshots land in
``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.serving_fixtures import free_ports

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_CONFIG = """ops:
  cifar10_raw:
    config:
      source: synthetic
      num_images: 500
      seed: 5
"""


def wait_for_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited early:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], env: dict[str, str], url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_for_http(url, process, log, timeout_s=180)
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole process group (dagster dev runs the webserver and the daemon)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "chromium is not installed: `apt-get install chromium chromium-driver` "
            "(scripts/install.sh does this when run as root)."
        )
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS
        )
        yield chromium
        chromium.close()


def dismiss_welcome(page) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(PlaywrightTimeout):  # the dialog shows only on a first visit
        page.get_by_role("button", name="Skip").click(timeout=5000)


def test_dagster_ui_shows_assets_and_runs_the_data_job(
    browser, project_env: dict[str, str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    # `dagster dev`, as the README says: the webserver plus the daemon that dequeues runs
    webserver = start(
        [
            str(PROJECT_ROOT / ".venv" / "bin" / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        subprocess_env(project_env),
        f"{base}/server_info",
        tmp_path / "webserver.log",
    )
    try:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})  # type: ignore[attr-defined]
        page.goto(f"{base}/asset-groups", wait_until="load", timeout=120_000)
        for group in ("data", "training", "serving", "monitoring"):
            page.get_by_text(group, exact=True).first.wait_for(timeout=60_000)
        dismiss_welcome(page)
        page.goto(f"{base}/assets", wait_until="load", timeout=120_000)
        for asset in ("cifar10_raw", "validation_report", "trained_model", "triton_deployment"):
            page.get_by_text(asset, exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "dagster_assets.png"), full_page=True)

        page.goto(
            f"{base}/locations/cifar_assets/jobs/data_job/playground",
            wait_until="load",
            timeout=120_000,
        )
        editor = page.locator(".CodeMirror").first
        editor.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.keyboard.insert_text(RUN_CONFIG)
        page.get_by_text("No errors").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "dagster_launchpad.png"))
        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url("**/runs/**", timeout=60_000)
        # the run's status tag in the page header turns from "Started" to "Success"
        page.get_by_text("Success", exact=True).first.wait_for(timeout=420_000)
        page.screenshot(path=str(ARTIFACTS / "dagster_run_success.png"), full_page=True)
    finally:
        stop(webserver)

    with dg.DagsterInstance.from_config(project_env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert [r.job_name for r in runs] == ["data_job"]
        assert runs[0].status == dg.DagsterRunStatus.SUCCESS
        raw = instance.get_latest_materialization_event(dg.AssetKey("cifar10_raw"))
        assert raw is not None
        assert raw.asset_materialization.metadata["num_images"].value == 500  # type: ignore[union-attr]


def test_mlflow_ui_shows_the_registered_model(
    browser, project_env: dict[str, str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from cifar_assets.ml import tracking
    from cifar_assets.ml.model import Architecture, build_resnet18, save_model
    from cifar_assets.ml.registry import Registry
    from cifar_assets.settings import get_settings

    settings = get_settings()
    model_dir = save_model(
        build_resnet18(Architecture(stem="imagenet")), Architecture(stem="imagenet"), tmp_path / "m"
    ).parent
    with tracking.tracking_run(
        settings.mlflow_tracking_uri,
        settings.mlflow_experiment_name,
        "ui-test",
        {"purpose": "ui test"},
        settings.mlflow_artifact_root.as_uri(),
    ) as run_id:
        pass
    version = Registry(settings.mlflow_tracking_uri).register(
        run_id, model_dir, {"accuracy": 0.5}, "data-v1"
    )
    Registry(settings.mlflow_tracking_uri).promote(version.version, "ui test")

    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    ui = start(
        [
            str(PROJECT_ROOT / ".venv" / "bin" / "mlflow"),
            "ui",
            "--backend-store-uri",
            settings.mlflow_tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        subprocess_env(project_env),
        f"{base}/health",
        tmp_path / "mlflow.log",
    )
    try:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})  # type: ignore[attr-defined]
        page.goto(f"{base}/#/models", wait_until="load", timeout=120_000)
        page.get_by_text(settings.registered_model_name, exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_models.png"), full_page=True)
        # MLflow announces its new registry UI in a dialog on a first visit
        with contextlib.suppress(PlaywrightTimeout):
            page.get_by_role("button", name="Try it now").click(timeout=5000)
        page.get_by_text("champion", exact=False).first.wait_for(timeout=30_000)
        # into the model's page by clicking its name, as a person would
        page.get_by_role("link", name=settings.registered_model_name).first.click()
        page.get_by_text("champion", exact=False).first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_model_versions.png"), full_page=True)
    finally:
        stop(ui)
