"""The model-based simulation, a slice on PostgreSQL: the production executor (group commit),
the relay's and the read models' PostgreSQL stores, each sequence in a database of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID, uuid4

import psycopg
import pytest
from hypothesis import settings as hsettings
from hypothesis.stateful import run_state_machine_as_test
from psycopg import sql

from adapters.bootstrap import event_store_env
from adapters.pg_streams import pg_stream_loader
from adapters.positions import PgPositions
from adapters.projector import PgReadStore
from adapters.settings import Settings
from application.executors import GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.rule import Rule
from domain.user import User
from projections import store as pg_store
from projections.models import READ_MODELS
from tests import figures
from tests.keys import process_keys
from tests.simulation import TABLES, Crash, CrashableStore, Ids, PaletteSimulation, StepClock, Uploads


class PgCrashableStore(CrashableStore):
    """The next batch dies inside its transaction, after the reads, while writing rows."""

    def apply(self, envelopes: Any, fill: Any = None) -> Any:
        if not self.crash_next:
            return self.inner.apply(envelopes, fill)
        real = pg_store.write_rows

        def dying(*args: Any, **kwargs: Any) -> None:
            raise Crash("projector: mid-batch")

        pg_store.write_rows = dying  # type: ignore[assignment]
        try:
            return self.inner.apply(envelopes, fill)
        finally:
            pg_store.write_rows = real  # type: ignore[assignment]


class OnPostgres(PaletteSimulation):
    figures_name = "postgresql"
    base: Settings  # set by the test

    def make_service(self, uploads: Uploads) -> PaletteService:
        base_url = self.base.effective_database_url
        self.dbname = f"sim_{uuid4().hex[:12]}"
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
        self.url = urlunsplit(urlsplit(base_url)._replace(path=f"/{self.dbname}"))
        self.pg = psycopg.connect(self.url, autocommit=True)
        app = PaletteApplication(env=event_store_env(self.base.model_copy(update={"database_url": self.url}),
                                                     pool_size=2))
        # Snapshots every few events, so that the reloads after injected crashes start from them.
        self.committer = GroupCommitter(app, pg_stream_loader(app), snapshot_every={User: 3, Rule: 3}).start()
        return PaletteService(app, self.committer, StepClock(), Ids(), store=uploads, **process_keys())

    def make_store(self) -> Any:
        self.relay_positions = PgPositions.connect(self.url)
        return PgCrashableStore(PgReadStore(self.url))

    def __init__(self) -> None:
        super().__init__()
        self.positions = self._pg_positions()

    def _pg_positions(self) -> Any:
        outer = self

        class Positions:
            crash_at_save = False

            def get(self, name: str) -> int:
                return outer.relay_positions.get(name)

            def save(self, name: str, position: int) -> None:
                if self.crash_at_save:
                    raise Crash("relay: after publish, before the position is saved")
                outer.relay_positions.save(name, position)

        return Positions()

    def read_models(self) -> dict[str, dict[Any, dict[str, Any]]]:
        out: dict[str, dict[Any, dict[str, Any]]] = {}
        for model in READ_MODELS.values():
            for name, key in ((model.keyed_table, model.key), (model.append_table, ("id",))):
                if not name or name in out:
                    continue
                cur = self.pg.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("palette_read", name)))
                cols = [d.name for d in cur.description or []]
                rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
                out[name] = {(r[key[0]] if name == model.append_table else tuple(r[k] for k in key)): r
                             for r in rows}
        assert set(out) == set(TABLES)
        return out

    def tracking(self, model: str) -> dict[UUID, int]:
        return dict(self.pg.execute(sql.SQL("SELECT stream_id, version FROM {}").format(
            sql.Identifier("palette_read", pg_store.tracking_table(READ_MODELS[model])))).fetchall())

    def parked(self) -> int:
        row = self.pg.execute("SELECT count(*) FROM palette_read.dead_letters").fetchone()
        return int(row[0]) if row else 0

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.committer.stop()
            row = self.pg.execute("SELECT count(*) FROM palette_snapshots").fetchone()
            assert row is not None and row[0] == self.committer.snapshots_taken  # every one taken was stored
            figures.add("simulation[postgresql]: snapshots taken", self.committer.snapshots_taken)
            self.svc.app.close()
            self.store.inner.close()
            self.relay_positions.close()
            self.pg.close()
            with psycopg.connect(self.base.effective_database_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(self.dbname)))


@pytest.fixture
def on_postgres(settings: Settings) -> Iterator[type[OnPostgres]]:
    OnPostgres.base = settings
    yield OnPostgres


def test_the_simulation_holds_on_postgresql(on_postgres):
    long = os.environ.get("PALETTE_LONG") == "1"  # `make chaos`
    run_state_machine_as_test(on_postgres, settings=hsettings(max_examples=300 if long else 40,
                                                              stateful_step_count=60 if long else 40, deadline=None))
