"""Shared pytest set-up: each real-server harness lives in its own plugin module."""

pytest_plugins = [
    "tests.plugins.data",
    "tests.plugins.s3",
    "tests.plugins.mlflow_server",
    "tests.plugins.prefect_server",
    "tests.plugins.browser",
]
