"""cifar-app, the Streamlit prediction and feedback page.

The library parts (image preparation, error wording, the Watch page's readers) are tested
directly; the page itself is started the way a user starts it, with the ``cifar-app`` console
script on a free port, against a real tritonserver (versions 1 and 2, weights 0.9/0.1), and
driven in Debian's chromium through Playwright. Screenshots land in ``test-artifacts/``, and a
browser test that fails leaves ``failed-<test>.png`` there.

The browser tests share one tab (one session) and run in file order: feedback given in one is
counted in the next ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from cifar_assets.app.config import app_config
from cifar_assets.app.images import ImageFileError, prepare_upload, random_test_images
from cifar_assets.app.predict import explain, service_problem
from cifar_assets.app.watch import latest_ab_report, latest_drift_reports, traffic_by_version
from cifar_assets.data.synthetic import generate_synthetic
from cifar_assets.serving import repository
from cifar_assets.serving.capture import join_feedback, read_capture, read_feedback
from cifar_assets.serving.client import ServingError
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.serving_fixtures import ServingEnv, free_ports
from tests.test_ab_promotion import point_settings_at
from tests.test_ui import ARTIFACTS, BROWSER_ARGS, CHROMIUM, start, stop

MODEL_NAME = "cifar10-resnet18"
REQUEST_ID = re.compile(r"request id ([0-9a-f]{32})")
USER_ID = re.compile(r"Your user id is (web-[0-9a-f]{12})")
SAMPLE_RATE = 0.5  # the triton_server fixture's capture_input_sample_rate


def router_samples(request_id: str) -> bool:
    """Whether the router keeps this request's pixels for the drift check: its documented rule
    (ab_router_model.py ``sampled``), the first 8 bytes of sha256 as a fraction of 2**64."""
    digest = hashlib.sha256(f"sample:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < SAMPLE_RATE


NOISE = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def png_bytes(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def cut_short(data: bytes) -> bytes:
    """The first half of a file: its header reads, its pixels do not."""
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a ``width`` x ``height`` canvas in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write_capture(capture_dir: Path, rows: list[tuple[str, int, int]]) -> None:
    """Router records (request id, served version, predicted class), as the router writes."""
    records = capture_dir / "records"
    records.mkdir(parents=True)
    lines = [
        {
            "time": f"2026-01-01T00:00:{second:02d}.000+00:00",
            "request_id": request_id,
            "item": 0,
            "user_id": "u",
            "served_version": version,
            "predicted_class": predicted,
            "predicted_label": "x",
            "confidence": 0.5,
            "latency_ms": 3.0,
        }
        for second, (request_id, version, predicted) in enumerate(rows)
    ]
    (records / "0-1.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# The library parts


def test_prepare_upload_converts_as_image_folder_does_and_says_so() -> None:
    pixels = generate_synthetic(1, seed=3).images[0]
    large = np.asarray(Image.fromarray(pixels).resize((96, 64)))
    prepared = prepare_upload("cat.PNG", png_bytes(large, "RGBA"))
    assert prepared.pixels.shape == (32, 32, 3) and prepared.pixels.dtype == np.uint8
    assert prepared.notes == ["converted from RGBA to RGB", "resized from 96x64 to 32x32"]
    exact = prepare_upload("exact.png", png_bytes(pixels))
    assert exact.notes == [] and np.array_equal(exact.pixels, pixels)
    grey = prepare_upload("grey.JPG", jpeg_bytes(large, "L"))
    assert grey.pixels.shape == (32, 32, 3) and grey.pixels.dtype == np.uint8
    assert grey.notes == ["converted from L to RGB", "resized from 96x64 to 32x32"]
    # greyscale stays greyscale: the three channels are equal
    assert np.array_equal(grey.pixels[..., 0], grey.pixels[..., 2])


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("empty.png", b"", "is empty (0 bytes)"),
        ("notes.png", b"these are notes, not pixels", "is not an image that can be read"),
        ("huge.png", png_header_only(9000, 9000), "9000x9000 pixels (81 megapixels)"),
        ("big.png", b"\0" * (26 * 1024 * 1024), "the limit is 25 MB"),
        ("photo.gif", b"GIF89a", "is not a PNG or JPEG file"),
        ("cut.png", cut_short(png_bytes(NOISE)), "the file is probably cut short"),
        ("cut.jpg", cut_short(jpeg_bytes(NOISE, "RGB")), "the file is probably cut short"),
    ],
)
def test_prepare_upload_refuses_bad_files_in_words(name: str, data: bytes, says: str) -> None:
    with pytest.raises(ImageFileError, match=re.escape(says)):
        prepare_upload(name, data)


def test_random_test_images_name_their_class() -> None:
    images = random_test_images(4, seed=7)
    assert len(images) == 4 and all(image.pixels.shape == (32, 32, 3) for image in images)
    assert all(image.drawn_as for image in images)


def test_explain_tells_down_from_no_model_from_refused() -> None:
    url = "127.0.0.1:8000"
    down = explain(ConnectionRefusedError(111, "Connection refused"), url)
    assert down.kind == "down" and "not answering" in down.message and url in down.message
    no_weights = ServingError("cifar10_ab: no A/B weights at /x/ab_weights.json; set them")
    assert explain(no_weights, url).kind == "no_model"
    unknown = ServingError("Request for unknown model: 'cifar10_ab' is not found")
    assert explain(unknown, url).kind == "no_model"
    refused = explain(ServingError("input 'images_uint8' has the wrong shape"), url)
    assert refused.kind == "refused" and "wrong shape" in refused.details
    (closed,) = free_ports(1)
    nobody = service_problem(f"127.0.0.1:{closed}")
    assert nobody is not None and nobody.kind == "down"


def test_watch_readers(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    write_capture(capture, [("a", 1, 3), ("b", 1, 3), ("c", 2, 5), ("d", 1, 4)])
    (capture / "feedback.jsonl").write_text(
        "".join(
            json.dumps(
                {"time": "2026-01-01T00:01:00+00:00", "request_id": r, "item": 0, "label": y}
            )
            + "\n"
            for r, y in (("a", 3), ("b", 4), ("d", 4))
        )
    )
    traffic = traffic_by_version(capture).set_index("version")
    assert traffic.loc[1, ["requests", "feedback", "correct"]].tolist() == [3, 3, 2]
    assert traffic.loc[1, "accuracy"] == pytest.approx(2 / 3)
    assert 0 < traffic.loc[1, "ci_low"] < 2 / 3 < traffic.loc[1, "ci_high"] < 1
    assert traffic.loc[2, "feedback"] == 0 and np.isnan(traffic.loc[2, "accuracy"])
    assert traffic_by_version(tmp_path / "nothing").empty

    storage = tmp_path / "storage"
    assert latest_ab_report(storage) is None and latest_drift_reports(storage) == []
    (storage / "ab_test_report").mkdir(parents=True)
    (storage / "ab_test_report" / "ab_report.json").write_text(
        json.dumps(
            {
                "decision": "keep_testing",
                "reason": "Not enough feedback yet",
                "control": 1,
                "treatment": 2,
            }
        )
    )
    report = latest_ab_report(storage)
    assert report is not None and report.decision == "keep_testing" and report.picture is None
    for batch, drift in (("batch-old", False), ("batch-new", True)):
        folder = storage / "drift_report" / batch
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(
            json.dumps(
                {
                    "model_version": "1",
                    "n": 50,
                    "drift": drift,
                    "score": 0.99,
                    "moved_features": ["brightness"],
                    "batch_accuracy": None,
                }
            )
        )
        (folder / "drift_overview.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
        time.sleep(0.01)
    reports = latest_drift_reports(storage, limit=1)
    assert [(r.batch, r.drift, len(r.pictures)) for r in reports] == [("batch-new", True, 1)]


def test_cifar_app_binds_localhost_without_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_assets.app.cli import streamlit_args

    monkeypatch.setenv("CIFAR_APP_PORT", "8765")
    from cifar_assets.settings import get_settings

    args = streamlit_args(get_settings().app_port, ["--theme.base=dark"])
    assert args[0] == "run" and args[1].endswith("streamlit_app.py")
    for expected in (
        "--server.address=127.0.0.1",
        "--server.port=8765",
        "--server.headless=true",
        "--browser.gatherUsageStats=false",
    ):
        assert expected in args
    assert args[-1] == "--theme.base=dark"  # the user's own options come last and win
    assert app_config().dagster_url == "http://127.0.0.1:3000"


# ---------------------------------------------------------------------------------------------
# The page in a browser, against a real tritonserver


def register_aliases(var: Path, tracking_uri: str, champion: int, challenger: int) -> None:
    """MLflow's aliases for the fixture's versions (the rollout's Watch view reads them)."""
    from cifar_assets.ml.tracking import client_for

    client = client_for(tracking_uri)
    client.create_registered_model(MODEL_NAME)
    for _ in range(max(champion, challenger)):
        client.create_model_version(MODEL_NAME, source=(var / "placeholder").as_uri())
    client.set_registered_model_alias(MODEL_NAME, "champion", str(champion))
    client.set_registered_model_alias(MODEL_NAME, "challenger", str(challenger))


@pytest.fixture(scope="module")
def app_url(triton_server: ServingEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """cifar-app started as a user starts it, pointed at the fixture's server and state."""
    var = triton_server.state_dir.parent
    tracking_uri = f"sqlite:///{var / 'mlflow.db'}"
    register_aliases(var, tracking_uri, champion=1, challenger=2)
    # the rollout's record of the versions that passed their Triton check (the fixture skips it)
    (triton_server.state_dir / "rollout.json").write_text(
        json.dumps({"verified": [1, 2], "challenger_share": 0.1})
    )
    (port,) = free_ports(1)
    env = subprocess_env(
        {
            "CIFAR_VAR_DIR": str(var),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "TRITON_MODEL_REPOSITORY": str(triton_server.repo),
            "TRITON_HOST": "127.0.0.1",
            "TRITON_HTTP_PORT": str(triton_server.config.http_port),
            "CIFAR_APP_PORT": str(port),
        }
    )
    for name in ("CIFAR_STORAGE_DIR", "CIFAR_CAPTURE_DIR", "CIFAR_TRITON_CONTROL_KEY"):
        env.pop(name, None)
    log = tmp_path_factory.mktemp("app") / "cifar-app.log"
    url = f"http://127.0.0.1:{port}"
    app = start(
        [str(PROJECT_ROOT / ".venv" / "bin" / "cifar-app")], env, f"{url}/_stcore/health", log
    )
    yield url
    stop(app)


@pytest.fixture(scope="module")
def page(app_url: str) -> Iterator[Any]:
    """One browser tab for the module: one session, so one user id and one feedback count."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `apt-get install chromium chromium-driver`.")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS
        )
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.set_default_timeout(60_000)  # 2 shared cores under load
        tab.goto(app_url, wait_until="load")
        yield tab
        browser.close()


@pytest.fixture(autouse=True)
def screenshot_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A browser test that fails leaves ``test-artifacts/failed-<test>.png``: the page as it was
    when the test failed. (pytest has logged the test's call by the time its function-scoped
    fixtures are torn down, so the session's failure count already includes it.)"""
    failed_before = request.session.testsfailed
    yield
    tab = request.node.funcargs.get("page")
    if tab is None or request.session.testsfailed == failed_before:
        return
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"failed-{request.node.name}.png"
    try:
        whole_page_picture(tab, path)
    except Exception as error:  # a closed browser: the failure itself is what matters
        print(f"no screenshot of the failure: {type(error).__name__}: {error}")
    else:
        print(f"the page when the test failed: {path}")


def settle(page: Any) -> None:
    """Wait for Streamlit's script run to end: until then, elements of the previous run stay on
    the page, marked stale."""
    page.wait_for_function(
        "() => !document.querySelector('[data-stale=\"true\"]') && "
        "!document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')"
    )


def page_text(page: Any) -> str:
    """The page's text once its run has ended; never a traceback."""
    settle(page)
    text = page.inner_text("body")
    assert "Traceback" not in text
    return text


# Streamlit scrolls inside its own container, not the document: a full-page screenshot would
# stop at the window's edge, so the window is made as tall as the content for the picture.
CONTENT_HEIGHT = """() => Math.max(document.documentElement.scrollHeight,
    ...[...document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"]')]
        .map((element) => element.scrollHeight))"""


def whole_page_picture(page: Any, path: Path) -> None:
    window = page.viewport_size
    height = min(int(page.evaluate(CONTENT_HEIGHT)), 10_000)
    page.set_viewport_size({"width": window["width"], "height": max(height, window["height"])})
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(window)


def screenshot(page: Any, name: str) -> None:
    settle(page)
    whole_page_picture(page, ARTIFACTS / f"{name}.png")


def upload(page: Any, name: str, data: bytes, mime: str = "image/png") -> None:
    page.locator("input[type=file]").set_input_files(
        [{"name": name, "mimeType": mime, "buffer": data}]
    )


def test_upload_shows_a_prediction(page: Any, triton_server: ServingEnv) -> None:
    pixels = generate_synthetic(1, seed=11).images[0]
    big = np.asarray(Image.fromarray(pixels).resize((200, 150)))
    started = time.monotonic()
    upload(page, "my_photo.png", png_bytes(big))
    page.get_by_text("served by model version").first.wait_for()
    shown_after = time.monotonic() - started
    text = page_text(page)
    assert "my_photo.png" in text and "resized from 200x150 to 32x32" in text
    request_id = REQUEST_ID.findall(text)[-1]
    capture = read_capture(triton_server.capture_dir)
    row = capture[capture["request_id"] == request_id].iloc[0]
    assert f"served by model version {row['served_version']}" in text
    assert row["user_id"] in text  # the session's user id, shown on the page
    screenshot(page, "app_prediction")
    print(f"upload to prediction shown: {shown_after:.2f} s")


def tracking_uri_of(env: ServingEnv) -> str:
    """The MLflow store the app fixture points cifar-app at."""
    return f"sqlite:///{env.state_dir.parent / 'mlflow.db'}"


def materialize_ab_test_report(env: ServingEnv, monkeypatch: pytest.MonkeyPatch) -> dg.Output[Any]:
    """The ab_test_report asset itself, on the app's Triton, capture and MLflow store: it writes
    ``<storage>/ab_test_report/ab_report.json``, which the Watch page reads."""
    from cifar_assets.artifacts import TritonDeployment
    from cifar_assets.assets.monitoring_assets import ABTestConfig, ab_test_report
    from cifar_assets.resources import MLflowResource, TritonResource

    uri = tracking_uri_of(env)
    point_settings_at(env, uri, monkeypatch)
    monkeypatch.delenv("CIFAR_STORAGE_DIR", raising=False)
    deployment = TritonDeployment("cifar10_resnet18", 2, [1, 2], "", "")  # the input only
    output = ab_test_report(
        context=dg.build_asset_context(),
        config=ABTestConfig(),
        triton=TritonResource(start_if_down=False),
        mlflow=MLflowResource(tracking_uri=uri),
        triton_deployment=deployment,
    )
    assert isinstance(output, dg.Output)
    return output


def give_feedback_as(page: Any, index: int, label: str, given: int) -> None:
    """Choose ``label`` in the ``index``-th picture's "Wrong? It is a …" box."""
    page.get_by_role("combobox").nth(index).click()
    page.keyboard.type(label)  # the list is virtualised: type to bring the option up
    page.get_by_role("option", name=label, exact=True).click()
    page.get_by_text(f"Feedback given this session: {given}.").wait_for()
    page.get_by_text(f"Thank you: recorded as {label}").first.wait_for()


# The page shows 7 request ids (the upload and 6 random images), none of the previous round's.
SEVEN_NEW_PREDICTIONS = """(previous) => {
    const shown = document.body.innerText.match(/request id [0-9a-f]{32}/g) || [];
    return shown.length === 7 && !previous.some((id) => shown.includes(`request id ${id}`));
}"""


def test_feedback_reaches_the_capture_and_the_ab_report(
    page: Any, triton_server: ServingEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feedback from the page is counted per version by the ab_test_report asset. The second
    feedback goes to an image whose pixels the router keeps for the drift check, so that the
    last test of this module always finds a labelled image in the drift batch."""
    from cifar_assets.data.imageset import CLASSES

    text = page_text(page)
    first = REQUEST_ID.findall(text)[-1]
    predicted = re.search(r"Correct: it is a (\w+)", text)
    assert predicted is not None
    page.get_by_role("button", name=f"Correct: it is a {predicted[1]}").click()
    page.get_by_text("Feedback given this session: 1.").wait_for()

    requests, shown = 1, [first]
    for _ in range(5):  # each round has 6 images, each kept with probability 0.5
        page.get_by_role("button", name="Try random test images").click()
        page.wait_for_function(SEVEN_NEW_PREDICTIONS, arg=shown[1:])
        requests += 6
        shown = REQUEST_ID.findall(page_text(page))
        assert shown[0] == first and len(shown) == 7, shown
        kept = [index for index in range(1, 7) if router_samples(shown[index])]
        if kept:
            break
    assert kept, "the router kept none of 30 images' pixels (sample rate 0.5)"
    second = shown[kept[0]]
    give_feedback_as(page, kept[0], "ship", given=2)
    screenshot(page, "app_feedback")

    joined = join_feedback(triton_server.capture_dir).set_index("request_id")
    assert joined.loc[first, "label"] == CLASSES.index(predicted[1])
    assert bool(joined.loc[first, "correct"])
    assert joined.loc[second, "label"] == CLASSES.index("ship")

    output = materialize_ab_test_report(triton_server, monkeypatch)
    versions = output.value.details["versions"]
    served = joined.loc[[first, second], "served_version"]
    assert {int(v): stats["n_feedback"] for v, stats in versions.items()} == {
        version: int((served == version).sum()) for version in (1, 2)
    }
    assert sum(stats["requests"] for stats in versions.values()) == requests
    written = json.loads(
        (
            triton_server.state_dir.parent / "storage" / "ab_test_report" / "ab_report.json"
        ).read_text()
    )
    # what the Watch page shows is this materialization's file
    assert written["versions"] == json.loads(json.dumps(versions, default=str))


def test_reload_keeps_the_user_id_and_so_the_version(
    page: Any, app_url: str, triton_server: ServingEnv
) -> None:
    """The user id lives in the address too: a reload (a new session) keeps it, and the router
    sends the same person to the same version."""
    user_id = USER_ID.findall(page_text(page))[0]
    assert f"uid={user_id}" in page.url
    page.get_by_role("link", name="Watch").click()
    page.get_by_text("Requests and feedback per version").wait_for()
    assert f"uid={user_id}" in page.url  # moving between the pages keeps it
    page.get_by_role("link", name="Predict").click()
    page.get_by_text("What is in this picture?").wait_for()
    page.reload(wait_until="load")
    page.get_by_text("Feedback given this session: 0.").wait_for()  # a new session
    assert USER_ID.findall(page_text(page)) == [user_id]
    upload(page, "after_reload.png", png_bytes(generate_synthetic(1, seed=9).images[0]))
    page.get_by_text("served by model version").first.wait_for()
    request_id = REQUEST_ID.findall(page_text(page))[-1]
    capture = read_capture(triton_server.capture_dir)
    mine = capture[capture["user_id"] == user_id]
    assert request_id in set(mine["request_id"]) and len(mine) > 1
    assert mine["served_version"].nunique() == 1
    screenshot(page, "app_after_reload")

    other = page.context.browser.new_page()  # its own context: no shared cookies
    other.set_default_timeout(60_000)
    try:
        other.goto(app_url, wait_until="load")
        other.get_by_text("Your user id is").wait_for()
        assert USER_ID.findall(page_text(other)) != [user_id]  # an address without uid: a new id
    finally:
        other.close()


def test_bad_files_get_a_message_not_a_traceback(page: Any) -> None:
    """Bad files beside a good greyscale JPEG: each bad one gets its sentence, the JPEG is
    converted, resized, said so, and predicted."""
    grey = np.asarray(Image.fromarray(NOISE).resize((96, 64)).convert("L"))
    page.locator("input[type=file]").set_input_files(
        [
            {"name": name, "mimeType": mime, "buffer": data}
            for name, mime, data in (
                ("notes.png", "image/png", b"these are notes, not pixels"),
                ("empty.png", "image/png", b""),
                ("huge.png", "image/png", png_header_only(9000, 9000)),
                ("cut.png", "image/png", cut_short(png_bytes(NOISE))),
                ("grey.jpg", "image/jpeg", jpeg_bytes(grey, "L")),
            )
        ]
    )
    page.get_by_text("notes.png is not an image that can be read").wait_for()
    page.get_by_text("empty.png is empty (0 bytes)").wait_for()
    page.get_by_text("huge.png is 9000x9000 pixels").wait_for()
    page.get_by_text("cut.png could not be decoded").wait_for()
    page.get_by_text("Note: converted from L to RGB; resized from 96x64 to 32x32.").wait_for()
    page.get_by_text("served by model version").first.wait_for()
    text = page_text(page)
    assert "the file is probably cut short" in text
    grey_card = text.rsplit("grey.jpg", 1)[1]  # the last card: after the uploader's list
    assert "resized from 96x64" in grey_card and "served by model version" in grey_card
    screenshot(page, "app_bad_files")


def test_watch_shows_rollout_traffic_decision_and_drift(
    page: Any, triton_server: ServingEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = triton_server.state_dir.parent / "storage"
    batch = storage / "drift_report" / "batch-monday"
    batch.mkdir(parents=True)
    (batch / "report.json").write_text(
        json.dumps(
            {
                "model_version": "1",
                "n": 200,
                "drift": True,
                "score": 0.999,
                "moved_features": ["brightness_mean"],
                "batch_accuracy": None,
            }
        )
    )
    (batch / "drift_overview.png").write_bytes(png_bytes(np.full((40, 60, 3), 200, np.uint8)))
    # the decision depends on which version this session's user hashed to (all its requests go
    # there, a sample ratio mismatch when that is the 10% version): read it from the asset
    report = materialize_ab_test_report(triton_server, monkeypatch).value
    decision = {"decision": report.decision, "reason": report.reason}
    page.get_by_role("link", name="Watch").click()
    page.get_by_text("MLflow, the router and Triton agree.").wait_for()
    page.get_by_text(decision["decision"], exact=True).wait_for()
    page.get_by_text("batch-monday").wait_for()
    text = page_text(page)
    for expected in ("champion", "challenger", "90%", "10%", decision["reason"]):
        assert expected in text
    assert "drift (score 1.00, 200 images" in text and "brightness_mean" in text
    traffic = traffic_by_version(triton_server.capture_dir)
    for row in traffic.itertuples():
        assert f"{row.requests}" in text
    links = {
        page.get_by_role("link", name=name).get_attribute("href")
        for name in ("Open Dagster", "Open MLflow")
    }
    assert links == {"http://127.0.0.1:3000", "http://127.0.0.1:5000"}
    page.locator("img").nth(1).wait_for()  # the A/B results and the drift overview
    screenshot(page, "app_watch")
    page.get_by_role("link", name="Predict").click()
    page.get_by_text("What is in this picture?").wait_for()


def test_no_model_deployed_gets_its_message(page: Any, triton_server: ServingEnv) -> None:
    weights = triton_server.state_dir / repository.AB_WEIGHTS_FILE
    aside = weights.with_name("weights.aside")
    weights.rename(aside)
    try:
        upload(page, "after_undeploy.png", png_bytes(generate_synthetic(1, seed=2).images[0]))
        page.get_by_text("No model is deployed for predictions yet").wait_for()
        page_text(page)
        screenshot(page, "app_no_model")
    finally:
        aside.rename(weights)


def test_router_not_loaded_gets_its_message(page: Any, triton_server: ServingEnv) -> None:
    """cifar10_ab unloaded through Triton's model-control API, with the project's key: the
    server answers, the router does not exist."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton_server.http_url)
    client.unload_model(
        repository.ROUTER_NAME, headers=repository.control_headers(triton_server.state_dir)
    )
    try:
        deadline = time.monotonic() + 60
        while client.is_model_ready(repository.ROUTER_NAME):
            assert time.monotonic() < deadline, "Triton did not unload cifar10_ab in 60 s"
            time.sleep(0.5)
        page.reload(wait_until="load")  # nothing left from the previous test's message
        page.get_by_text("No model is deployed for predictions yet").wait_for()
        page.get_by_text("Details for the platform team").click()
        page.get_by_text(
            f"{repository.ROUTER_NAME} at {triton_server.http_url} is not ready"
        ).wait_for()
        upload(page, "no_router.png", png_bytes(generate_synthetic(1, seed=6).images[0]))
        page.get_by_text("Not predicted: the prediction service cannot answer").wait_for()
        text = page_text(page)
        assert "served by model version" not in text
        screenshot(page, "app_no_router")
    finally:
        repository.load_router(
            triton_server.http_url,
            repo=triton_server.repo,
            state_dir=triton_server.state_dir,
            capture_dir=triton_server.capture_dir,
            capture_input_sample_rate=SAMPLE_RATE,
        )


def test_triton_stopped_gets_its_message(
    page: Any, app_url: str, triton_server: ServingEnv
) -> None:
    triton_server.server.stop()
    page.goto(app_url, wait_until="load")
    page.get_by_text("The prediction service is not answering").wait_for()
    upload(page, "while_down.png", png_bytes(generate_synthetic(1, seed=4).images[0]))
    page.get_by_text("Not predicted: the prediction service cannot answer").wait_for()
    page_text(page)
    screenshot(page, "app_triton_down")
    page.get_by_role("link", name="Watch").click()
    page.get_by_text("Requests and feedback per version").wait_for()
    page_text(page)


def test_feedback_reaches_the_labelled_drift_batch(triton_server: ServingEnv) -> None:
    """The capture partitions of drift_report label the router's sampled pixels with feedback
    (drift/incoming.py batch_from_capture): every image given feedback in the page whose pixels
    were sampled arrives labelled. The feedback test gave feedback on at least one image the
    router samples. Stopping the server flushes the sampled pixels."""
    from cifar_assets.drift.incoming import batch_from_capture
    from cifar_assets.serving.capture import read_captured_inputs

    triton_server.server.stop()
    feedback = read_feedback(triton_server.capture_dir)
    expected = feedback[feedback["request_id"].map(router_samples)]
    assert len(expected) >= 1, "no feedback on a sampled image: run the whole module"
    _, sampled_ids = read_captured_inputs(triton_server.capture_dir)
    sampled = feedback[feedback["request_id"].isin(set(sampled_ids.astype(str)))]
    assert set(sampled["request_id"]) == set(expected["request_id"])
    batch = batch_from_capture(triton_server.capture_dir)
    assert batch is not None
    labelled = batch.labels[batch.labels >= 0]
    assert len(labelled) >= 1
    assert sorted(labelled.tolist()) == sorted(sampled["label"].tolist())
    print(f"{len(sampled)} of {len(feedback)} feedback labels reached the drift batch (sampled)")
