"""Shared fixtures: an Ingestor on SQLite and on a real PostgreSQL (see tests/services.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.config import load_settings
from ingest.service import Ingestor

pytest_plugins = ["tests.services"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _config_env_restored() -> Iterator[None]:
    """The CLI exports ``TICKETGATE_CONFIG`` for its child processes; a command run in-process
    by a test must not leave it set for the tests after it."""
    saved = os.environ.get("TICKETGATE_CONFIG")
    yield
    if saved is None:
        os.environ.pop("TICKETGATE_CONFIG", None)
    else:
        os.environ["TICKETGATE_CONFIG"] = saved


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every test that takes this runs twice: on SQLite (the default) and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ticketgate.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
def make_ingestor(db_url: str) -> Iterator[Callable[..., Ingestor]]:
    """Build an Ingestor from TOML text (or the demo config) on the test's database."""
    made: list[Ingestor] = []

    def build(toml: str | None = None, tmp: Path | None = None, **overrides: Any) -> Ingestor:
        path = None
        if toml is not None:
            assert tmp is not None, "pass tmp_path with toml"
            path = tmp / f"ticketgate-{len(made)}.toml"
            path.write_text(toml, encoding="utf-8")
        ingestor = Ingestor(load_settings(path, database_url=db_url, **overrides))
        made.append(ingestor)
        return ingestor

    yield build
    for ingestor in made:
        ingestor.close()
