"""Errors a user can cause while pointing the project at data, each with a message saying what to do."""

from __future__ import annotations


class DataSourceError(ValueError):
    """A data source is missing, corrupted or malformed; the message names where and what to do next."""
