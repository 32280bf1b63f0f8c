"""Broker administration: readiness probe and topic creation (works on Kafka and Tansu)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

# kafka-python logs every refused connection at ERROR while the broker starts; readiness polls expect that.
logging.getLogger("kafka").setLevel(logging.CRITICAL)


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


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int, attempts: int = 5) -> None:
    """Create the topics that do not exist yet. A protocol error is retried: the embedded broker
    has answered a CreateTopics with a truncated response, once in a few hundred starts."""
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
            return
        except KafkaProtocolError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
        finally:
            admin.close()
