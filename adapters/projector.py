"""The projector process: consumer group ``palette-projections`` folds ``palette.events`` into the
read models; database commit first (rows + tracking, one transaction), Kafka offset second."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from adapters.envelope import EventEnvelope, decode
from adapters.kafka_io import ConsumerLoop
from projections.store import BatchResult, apply_batch, ensure_schema

log = logging.getLogger("palette.projector")
GROUP = "palette-projections"


class Projector(ConsumerLoop):
    def __init__(self, consumer: Any, database_url: str) -> None:
        self.consumer = consumer
        self.conn = psycopg.connect(database_url, autocommit=True)
        ensure_schema(self.conn)
        self.totals = BatchResult()

    def step(self, timeout_ms: int = 100) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        envelopes: list[EventEnvelope] = []
        for records in polled.values():
            for record in records:
                try:
                    envelopes.append(decode(record.value))
                except ValueError:
                    # Only the relay writes this topic; an undecodable message is a bug, not data.
                    log.error("undecodable message at %s:%s offset %s skipped",
                              record.topic, record.partition, record.offset)
        if not polled:
            return 0
        result = apply_batch(self.conn, envelopes)
        self.consumer.commit()
        self.totals.applied += result.applied
        self.totals.skipped += result.skipped
        self.totals.parked += result.parked
        return len(envelopes)

    def close(self) -> None:
        self.consumer.close()
        self.conn.close()
