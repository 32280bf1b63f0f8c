"""What a command uses of a running stack: its settings, its event store, its erased users."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from adapters.settings import Settings, load_settings

if TYPE_CHECKING:
    from application.services import PaletteApplication


def running_settings() -> Settings:
    """load_settings for a command that uses a running stack. Run where no stack ran (outside the
    checkout, the data directory being the relative ``.palette`` unless PALETTE_DATA_DIR says
    otherwise), a command gets development secrets made afresh, which nothing running knows: it
    says so, rather than fail later for a reason that seems unrelated (a token refused, a
    database password wrong)."""
    def fresh(path: Path) -> None:
        if "PALETTE_DATA_DIR" not in os.environ:
            print(f"palette: no development secrets were in {path.parent}: made new ones, which no running stack "
                  "uses (run palette from the checkout that ran `make run`, or set PALETTE_DATA_DIR)", file=sys.stderr)

    return load_settings(fresh)


def reach_database(settings: Settings) -> None:
    """One connection, before a command opens its pools: a pool's refusal, whatever its reason (a
    wrong password, no such database, nobody listening), is "couldn't get a connection after
    10.00 sec", said only after those 10 s; this one's error says why, at once."""
    import psycopg

    psycopg.connect(settings.effective_database_url, connect_timeout=10).close()


def event_store(settings: Settings) -> PaletteApplication:
    """The event store, opened after one connection of its own (``reach_database``)."""
    from adapters.bootstrap import open_event_store

    reach_database(settings)
    return open_event_store(settings, pool_size=2, saves=False)


def erased_users(settings: Settings) -> frozenset[UUID]:
    import psycopg

    from adapters.keyring import all_erased

    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        return all_erased(conn)

