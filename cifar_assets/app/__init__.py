"""``cifar-app``: a Streamlit page where people who are not engineers try the served model and
label what it got wrong.

The page code (``ui.py``) only lays out what small, testable functions return: ``images``
turns uploads into the 32x32 RGB images the model takes, ``predict`` asks the A/B router and
records feedback, ``watch`` reads the rollout state, the captured traffic and the monitoring
reports. The app reads files and URLs only; it never imports Dagster.
"""
