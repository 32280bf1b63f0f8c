"""Kafka producers and consumers configured for Palette (works on Apache Kafka and Tansu)."""

from __future__ import annotations

import logging
from typing import Any

from adapters.settings import Settings

logging.getLogger("kafka").setLevel(logging.WARNING)


def producer(settings: Settings, linger_ms: int = 5, batch_size: int = 256 * 1024) -> Any:
    """acks=all, one request in flight per connection: retries never reorder a stream."""
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=settings.effective_kafka_bootstrap, acks="all", linger_ms=linger_ms,
        batch_size=batch_size, max_in_flight_requests_per_connection=1, retries=5,
        request_timeout_ms=30000,
    )


def consumer(settings: Settings, group_id: str, *topics: str, max_poll_records: int = 1000,
             fetch_max_wait_ms: int = 20) -> Any:
    """Manual offset commits (after the database commit). The fetch wait bounds latency: new data
    does not wake a waiting fetch on the embedded broker, so latency-bound consumers keep it short."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        *topics, bootstrap_servers=settings.effective_kafka_bootstrap, group_id=group_id,
        enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=10000,
        heartbeat_interval_ms=2000, fetch_max_wait_ms=fetch_max_wait_ms, max_poll_records=max_poll_records,
        max_poll_interval_ms=300000,
    )
