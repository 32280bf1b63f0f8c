"""The model-based simulation in bulk, on the in-memory event store (see tests/simulation.py)."""

from __future__ import annotations

from hypothesis import settings

from application.services import PaletteApplication, PaletteService
from application.unit_of_work import DirectExecutor
from tests.simulation import Ids, PaletteSimulation, StepClock, Uploads


class InMemory(PaletteSimulation):
    figures_name = "memory"

    def make_service(self, uploads: Uploads) -> PaletteService:
        app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        return PaletteService(app, DirectExecutor(app), StepClock(), Ids(), store=uploads)


TestInMemory = InMemory.TestCase
TestInMemory.settings = settings(max_examples=400, stateful_step_count=60, deadline=None)
