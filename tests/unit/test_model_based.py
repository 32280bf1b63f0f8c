"""The model-based simulation in bulk, on the in-memory event store (see tests/simulation.py)."""

from __future__ import annotations

import os

from hypothesis import settings

from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
from tests.keys import process_keys
from tests.simulation import Ids, PaletteSimulation, StepClock, Uploads

LONG = os.environ.get("PALETTE_LONG") == "1"


class InMemory(PaletteSimulation):
    figures_name = "memory"

    def make_service(self, uploads: Uploads) -> PaletteService:
        app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        return PaletteService(app, DirectExecutor(app), StepClock(), Ids(), store=uploads, **process_keys())


TestInMemory = InMemory.TestCase
# `make chaos` (PALETTE_LONG=1) runs the long version.
TestInMemory.settings = settings(max_examples=5000 if LONG else 400, stateful_step_count=100 if LONG else 60,
                                 deadline=None)
