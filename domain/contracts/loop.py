"""The contract between ``palette serve`` and a consumer process: ``warm_up`` joins the group
(readiness), ``run`` loops until the stop event; ``step`` handles one poll."""

from __future__ import annotations

import threading
from typing import Any


class ConsumerLoop:
    """A consumer process's loop: ``step()`` handles one poll; subclasses set ``consumer``."""

    consumer: Any

    def step(self) -> int:
        raise NotImplementedError

    def warm_up(self, stop: threading.Event) -> None:
        """Join the consumer group: poll until partitions are assigned (the readiness signal)."""
        while not stop.is_set() and not self.consumer.assignment():
            self.step()

    def run(self, stop: threading.Event) -> None:
        """Until SIGTERM: the poll in flight is finished before the loop ends."""
        while not stop.is_set():
            self.step()
