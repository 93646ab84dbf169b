"""The one logging setup: JSON lines on stderr with request and run ids, level from LOG_LEVEL.

Serving, capture and pipeline code log through ``get_logger(component)``; context such as a
request id or a Dagster run id goes in ``extra={"request_id": ...}`` and becomes a JSON field.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from cifar_assets.settings import get_settings

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is context.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_ROOT = "cifar_assets"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "component": record.name.removeprefix(f"{_ROOT}."),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = (
                    value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
                )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str | None = None, stream: Any = None) -> logging.Logger:
    """Install the JSON handler on the project's root logger (idempotent)."""
    root = logging.getLogger(_ROOT)
    wanted = (level or get_settings().log_level).upper()
    if wanted not in logging.getLevelNamesMapping():
        raise ValueError(
            f"LOG_LEVEL={wanted!r} is not a log level; use DEBUG, INFO, WARNING, ERROR or CRITICAL."
        )
    root.setLevel(wanted)
    for handler in list(root.handlers):
        if getattr(handler, "_cifar_json", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._cifar_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False
    return root


def get_logger(component: str) -> logging.Logger:
    """A logger for one component (``serving``, ``capture``, ``pipeline``...)."""
    root = logging.getLogger(_ROOT)
    if not any(getattr(h, "_cifar_json", False) for h in root.handlers):
        configure_logging()
    return logging.getLogger(f"{_ROOT}.{component}")
