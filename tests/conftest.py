"""Fixtures for the whole suite live in tests/plugins/ (one module per concern)."""

import os

# Nothing in the tests may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.redis",
    "tests.plugins.models",
    "tests.plugins.live",
    "tests.plugins.operated",
    "tests.plugins.fakeremote",
    "tests.plugins.fakebackend",
]
