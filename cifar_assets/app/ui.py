"""The Streamlit pages of ``cifar-app``: Predict (with feedback) and Watch.

Only layout lives here; what is shown comes from ``images``, ``predict`` and ``watch``. Every
part of a page runs inside :func:`shown_errors`, so a failure becomes a sentence on the page,
never a traceback. Per browser session (``st.session_state``): the user id the router hashes
(so one person keeps one model version), the predictions already made (a rerun, e.g. after a
feedback click, sends nothing to Triton again) and the feedback given. The user id is also kept
in the page's address (``?uid=``), so a reload, which starts a new session, keeps it too.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from cifar_assets.app.config import AppConfig, app_config
from cifar_assets.app.images import ImageFileError, PreparedImage, prepare_upload
from cifar_assets.app.images import random_test_images as draw_test_images
from cifar_assets.app.predict import Prediction, ServiceProblem, explain, predict, service_problem
from cifar_assets.data.imageset import CLASSES
from cifar_assets.serving.client import ServingError

RANDOM_IMAGES = 6
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$])")
USER_ID_PARAM = "uid"
# What a user id taken from the address may look like: the ids this page makes (web-<12 hex>)
# and any other plain token, never text that would need escaping on the page or in the capture.
USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ZOOM = 4  # the 32x32 image is shown 4x larger, pixels kept sharp


def plain(text: str) -> str:
    """``text`` shown as it is: Streamlit renders strings as Markdown, and file names, server
    messages and reasons may hold its characters."""
    return _MARKDOWN.sub(r"\\\1", text)


@contextmanager
def shown_errors(what: str) -> Iterator[None]:
    """Turn any failure inside the block into a message on the page."""
    try:
        yield
    except Exception as error:
        st.error(
            f"{what} could not be shown: {plain(f'{type(error).__name__}: {error}')}. Reload "
            "the page; if this stays, tell the platform team."
        )


def _user_id() -> str:
    """The id in the page's address if it is one, else a new one."""
    given = st.query_params.get(USER_ID_PARAM, "")
    return given if USER_ID.fullmatch(given) else f"web-{uuid.uuid4().hex[:12]}"


def _state() -> Any:
    state = st.session_state
    if "user_id" not in state:
        state.user_id = _user_id()
        state.prepared = {}  # key -> PreparedImage or an error message
        state.predictions = {}  # key -> Prediction
        state.random_keys = []
        state.feedback = {}  # request id -> class name
        state.feedback_error = None
    return state


def show_problem(problem: ServiceProblem) -> None:
    (st.warning if problem.kind == "no_model" else st.error)(problem.message)
    with st.expander("Details for the platform team"):
        st.code(problem.details, language=None)


def _record(config: AppConfig, request_id: str, label: str) -> None:
    from cifar_assets.serving.capture import record_feedback

    state = _state()
    try:
        record_feedback(config.capture_dir, request_id, label)
    except (ValueError, OSError) as error:
        state.feedback_error = f"Your feedback was not recorded: {error}"
    else:
        state.feedback[request_id] = label
        state.feedback_error = None


def _record_choice(config: AppConfig, request_id: str) -> None:
    label = st.session_state.get(f"class-{request_id}")
    if label is not None:
        _record(config, request_id, label)


def _feedback(config: AppConfig, prediction: Prediction) -> None:
    request_id = prediction.request_id
    given = _state().feedback.get(request_id)
    if given is not None:
        st.success(f"Thank you: recorded as **{given}**. You can still change it.")
    left, right = st.columns([1, 2], vertical_alignment="bottom")
    left.button(
        f"Correct: it is a {prediction.top[0][0]}",
        key=f"correct-{request_id}",
        on_click=_record,
        args=(config, request_id, prediction.top[0][0]),
    )
    right.selectbox(
        "Wrong? It is a …",
        CLASSES,
        index=None,
        placeholder="choose the right class",
        key=f"class-{request_id}",
        on_change=_record_choice,
        args=(config, request_id),
    )


def _predict_missing(config: AppConfig, keys: list[str]) -> ServiceProblem | None:
    """Ask the router about every image not predicted yet; stop at the first failure, which
    is the service's, not the image's (the images were checked when they were prepared)."""
    state = _state()
    for key in keys:
        prepared = state.prepared[key]
        if isinstance(prepared, str) or key in state.predictions:
            continue
        try:
            state.predictions[key] = predict(prepared.pixels, state.user_id, config.triton_url)
        except (ServingError, OSError) as error:
            return explain(error, config.triton_url)
    return None


def _card(config: AppConfig, key: str) -> None:
    state = _state()
    prepared = state.prepared[key]
    with st.container(border=True):
        if isinstance(prepared, str):
            st.error(plain(prepared))
            return
        picture, answer = st.columns([1, 3])
        zoomed = prepared.pixels.repeat(ZOOM, axis=0).repeat(ZOOM, axis=1)
        picture.image(zoomed, caption="what the model sees (32x32)")
        with answer:
            st.markdown(f"**{plain(prepared.name)}**")
            if prepared.notes:
                st.caption("Note: " + "; ".join(prepared.notes) + ".")
            if prepared.drawn_as:
                st.caption(f"This test image was drawn as a {prepared.drawn_as}.")
            prediction = state.predictions.get(key)
            if prediction is None:
                st.caption("Not predicted: the prediction service cannot answer (see above).")
                return
            for label, probability in prediction.top:
                st.progress(probability, text=f"{label}: {probability:.1%}")
            st.caption(
                f"served by model version {prediction.served_version} · "
                f"{prediction.latency_ms:.0f} ms · request id {prediction.request_id}"
            )
            _feedback(config, prediction)


def _uploads() -> list[str]:
    state = _state()
    files = st.file_uploader(
        "Upload PNG or JPEG pictures (any size: they are shrunk to 32x32)",
        type=["png", "jpg", "jpeg"],
        accept_multiple_files=True,
    )
    keys = []
    for upload in files or []:
        key = f"upload-{upload.file_id}"
        if key not in state.prepared:
            try:
                state.prepared[key] = prepare_upload(upload.name, upload.getvalue())
            except ImageFileError as error:
                state.prepared[key] = str(error)
        keys.append(key)
    return keys


def _random_images() -> list[str]:
    state = _state()
    if st.button("Try random test images"):
        images: list[PreparedImage] = draw_test_images(RANDOM_IMAGES, secrets.randbelow(10**6))
        state.random_keys = [f"random-{image.name}" for image in images]
        state.prepared.update(zip(state.random_keys, images, strict=True))
    return list(state.random_keys)


def predict_page() -> None:
    config = app_config()
    state = _state()
    st.title("What is in this picture?")
    st.write(
        "The model tells ten kinds of things apart: "
        + ", ".join(CLASSES)
        + ". Give it pictures, then tell it whether it was right: your answers decide which "
        "model version is kept."
    )
    st.caption(
        f"Your user id is {state.user_id}: you keep the same model version while you use this "
        f"page's address. Feedback given this session: {len(state.feedback)}."
    )
    if state.feedback_error:
        st.error(plain(state.feedback_error))
    keys = _uploads() + _random_images()
    problem = service_problem(config.triton_url) or _predict_missing(config, keys)
    if problem is not None:
        show_problem(problem)
    for key in keys:
        with shown_errors("This picture"):
            _card(config, key)


def _percent(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.0%}"


def _rollout(config: AppConfig) -> None:
    from cifar_assets.app.watch import lifecycle

    st.subheader("Live rollout")
    view = lifecycle(config)
    if view.state is None:
        st.warning(plain(view.error or ""))
        return
    state = view.state
    roles = {state["champion"]: "champion", state["challenger"]: "challenger"}
    weights = {int(v): w for v, w in state["weights"].items()}
    versions = sorted(
        {*state["live_versions"], *weights, *(v for v in roles if v is not None)}, key=int
    )
    if not versions:
        st.info("No model version is registered or served yet: run main_job in Dagster.")
    else:
        st.table(
            [
                {
                    "version": version,
                    "role (MLflow alias)": roles.get(version, "-"),
                    "live in Triton": "yes" if version in state["live_versions"] else "no",
                    "share of traffic": _percent(weights.get(version)),
                }
                for version in versions
            ],
            hide_index=True,
        )
    if state.get("stage"):
        st.write(f"Rollout stage: **{state['stage']}** (since {state.get('stage_started')}).")
    if state.get("shadow"):
        version, share = state["shadow"]
        st.write(
            f"Version {version} runs in shadow on {share:.0%} of the requests: its answers are "
            "recorded for comparison, never shown."
        )
    if view.problems:
        listing = "\n- ".join(plain(problem) for problem in view.problems)
        st.warning(f"MLflow, the router and Triton disagree:\n\n- {listing}")
    elif versions:
        st.success("MLflow, the router and Triton agree.")
    if view.transitions:
        st.caption("Latest changes")
        st.table(
            [
                {
                    "when": record.get("time"),
                    "what": record.get("action"),
                    "version": record.get("version"),
                    "why": record.get("reason"),
                    "who": record.get("actor"),
                }
                for record in view.transitions
            ],
            hide_index=True,
        )


def _traffic(config: AppConfig) -> None:
    from cifar_assets.app.watch import traffic_by_version

    st.subheader("Requests and feedback per version")
    traffic = traffic_by_version(config.capture_dir)
    if traffic.empty:
        st.info("No request has been captured yet.")
        return
    st.table(
        [
            {
                "version": row.version,
                "requests": row.requests,
                "with feedback": row.feedback,
                "correct": row.correct,
                "accuracy": _percent(row.accuracy),
                "95% interval": "-"
                if row.feedback == 0
                else f"{row.ci_low:.0%} to {row.ci_high:.0%}",
            }
            for row in traffic.itertuples()
        ],
        hide_index=True,
    )
    st.caption(
        "The interval (Wilson) is where the true accuracy lies with 95% confidence; it narrows "
        "as feedback comes in."
    )


def _ab_decision(config: AppConfig) -> None:
    from cifar_assets.app.watch import latest_ab_report

    st.subheader("A/B decision")
    report = latest_ab_report(config.storage_dir)
    if report is None:
        st.info("No A/B report yet: materialize ab_test_report in Dagster.")
        return
    st.markdown(
        f"**{report.decision}** (version {report.treatment} against {report.control}, "
        f"report of {report.written_at:%Y-%m-%d %H:%M} UTC)"
    )
    st.write(plain(report.reason))
    if report.picture is not None:
        st.image(str(report.picture))


def _drift(config: AppConfig) -> None:
    from cifar_assets.app.watch import latest_drift_reports

    st.subheader("Latest drift reports")
    reports = latest_drift_reports(config.storage_dir)
    if not reports:
        st.info(
            "No drift report yet: drop a batch into the incoming folder, or run drift_check_job."
        )
    for report in reports:
        verdict = "drift" if report.drift else "no drift"
        accuracy = (
            "" if report.batch_accuracy is None else f", accuracy {report.batch_accuracy:.0%}"
        )
        st.markdown(
            f"**{report.batch}**: {verdict} (score {report.score:.2f}, {report.images} images"
            f"{accuracy}, checked with version {report.model_version}'s detectors, "
            f"{report.written_at:%Y-%m-%d %H:%M} UTC)"
        )
        if report.moved_features:
            st.caption("Moved features: " + plain(", ".join(report.moved_features)))
        for picture in report.pictures:
            st.image(str(picture))


def watch_page() -> None:
    config = app_config()
    st.title("How is the model doing?")
    left, right, refresh = st.columns(3)
    left.link_button("Open Dagster", config.dagster_url)
    right.link_button("Open MLflow", config.mlflow_ui_url)
    refresh.button("Refresh")
    for title, part in (
        ("The live rollout", _rollout),
        ("The traffic", _traffic),
        ("The A/B decision", _ab_decision),
        ("The drift reports", _drift),
    ):
        with shown_errors(title):
            part(config)


def main() -> None:
    st.set_page_config(page_title="CIFAR-10 classifier", layout="wide")
    with shown_errors("This page"):
        # every run, since moving between the pages drops the address's parameters
        st.query_params[USER_ID_PARAM] = _state().user_id
        pages = [
            st.Page(predict_page, title="Predict", url_path="predict", default=True),
            st.Page(watch_page, title="Watch", url_path="watch"),
        ]
        st.navigation(pages, position="top").run()
