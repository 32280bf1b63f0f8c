"""Broker administration: readiness probe and topic creation (works on Kafka and Tansu)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

# kafka-python logs every refused connection at ERROR while the broker starts; readiness polls expect that.
logging.getLogger("kafka").setLevel(logging.CRITICAL)
log = logging.getLogger("palette.kafka")


def broker_answers(bootstrap: str, timeout_ms: int = 2000) -> bool:
    """True when the broker answers a metadata request."""
    import socket

    from kafka import KafkaAdminClient
    from kafka.cluster import collect_hosts

    try:
        # read as the clients read it: a protocol prefix, [IPv6]:port, a host without its port (9092)
        host, port, _ = collect_hosts(bootstrap, randomize=False)[0]
        socket.create_connection((host or "127.0.0.1", port), timeout=timeout_ms / 1000).close()
    except (OSError, ValueError):
        return False  # refused or unreachable: answer at once instead of the client's long retries
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            admin.close()


def miscounted(described: Iterable[dict[str, Any]], names: Iterable[str],
               partitions: int) -> list[tuple[str, int]]:
    """Of a DescribeTopics answer, the topics among ``names`` with another partition count than
    ``partitions``, and theirs. A topic described with an error (one being deleted or made again,
    as the relay's rollover does) lists no partitions: that is no count, and is left out."""
    wanted = set(names)
    return [(t["name"], len(t["partitions"])) for t in described
            if t["name"] in wanted and not t.get("error_code") and t["partitions"]
            and len(t["partitions"]) != partitions]


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int, attempts: int = 5) -> None:
    """Create the topics that do not exist yet, and name (a warning) each that exists with another
    partition count, used as it is: one that holds records is never emptied here, and making one
    afresh while the relay may publish to it could drop what it publishes (the relay's rollover
    makes its topic again with ``partitions``, at its start when empty). A protocol error is
    retried: the embedded broker has answered a CreateTopics with a truncated response, once in
    a few hundred starts."""
    import time

    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaProtocolError, TopicAlreadyExistsError

    wanted = list(topics)
    for attempt in range(attempts):
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        try:
            have = set(admin.list_topics())
            missing = [NewTopic(t, partitions, 1) for t in wanted if t not in have]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(missing)
            if there := [t for t in wanted if t in have]:
                for name, count in miscounted(admin.describe_topics(there), there, partitions):
                    log.warning("the topic %s has %d partitions, not the %d PALETTE_KAFKA_PARTITIONS asks for: "
                                "used as it is", name, count, partitions)
            return
        except KafkaProtocolError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
        finally:
            admin.close()
