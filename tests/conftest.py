"""Shared test fixtures: the CLI runner and a way to invoke `matrixstack` as a user would."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from matrixstack.cli.main import app


@pytest.fixture
def cli():
    """Return a function that runs `matrixstack ARGS...` in-process and returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke
