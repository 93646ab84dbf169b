"""``cifar-app``: run the prediction and feedback app with Streamlit, on 127.0.0.1.

The port is ``CIFAR_APP_PORT`` (default 8501). Streamlit runs headless, with its usage
statistics off and uploads limited to ``images.MAX_UPLOAD_MB``; any further arguments go to
``streamlit run`` after these, so they win (``cifar-app --server.address 0.0.0.0`` listens on
every interface: put it behind an authenticating proxy first, the app has no login).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cifar_assets.app.images import MAX_UPLOAD_MB
from cifar_assets.settings import get_settings

SCRIPT = Path(__file__).with_name("streamlit_app.py")


def streamlit_args(port: int, extra: list[str]) -> list[str]:
    """The arguments of the ``streamlit`` command line that runs the app."""
    return [
        "run",
        str(SCRIPT),
        "--server.address=127.0.0.1",
        f"--server.port={port}",
        "--server.headless=true",
        "--browser.gatherUsageStats=false",
        f"--server.maxUploadSize={MAX_UPLOAD_MB}",
        "--server.fileWatcherType=none",
        "--client.showErrorDetails=none",
        "--client.toolbarMode=minimal",
        *extra,
    ]


def main() -> None:
    try:
        port = get_settings().app_port
    except ValueError as error:
        sys.exit(f"cifar-app: {error}")
    # The Watch page asks MLflow for the aliases: a tracking server that is down should cost a
    # few seconds and a message, not minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from streamlit.web import cli as streamlit_cli

    streamlit_cli.main(args=streamlit_args(port, sys.argv[1:]), prog_name="streamlit")
