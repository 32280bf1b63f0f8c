"""What a fetch costs the embedded broker as a partition's log grows (why ``adapters.rollover``
starts the log of palette.events afresh): a bare Tansu on memory storage, one partition grown in
batches of ``--batch`` records, and after every ``--step`` batches 100 fetches of the last 50
records, each timed (wall) and charged the broker's CPU (from /proc).

    .venv/bin/python -m tests.bench.broker_growth --batch 50 --step 400 --rounds 8"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from infra.stack import _tansu_binary
from tests.bench.harness import cpu_s
from tests.conftest import free_port


def main() -> None:
    from confluent_kafka import Producer
    from kafka import KafkaConsumer, TopicPartition

    from infra.kafka_admin import ensure_topics

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=50, help="records per produce batch")
    parser.add_argument("--step", type=int, default=400, help="batches between two measures")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    url = f"tcp://127.0.0.1:{free_port()}"
    broker = subprocess.Popen([_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                               "--storage-engine", "memory://tansu/"], env={**os.environ, "RUST_LOG": "warn"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bootstrap = url.removeprefix("tcp://")
    try:
        ensure_topics(bootstrap, ["growth"], 1)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
        tp = TopicPartition("growth", 0)
        reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
        reader.assign([tp])
        records = 0
        for _ in range(args.rounds):
            for _ in range(args.step):  # one flush, one produce request, one batch in the partition
                for _ in range(args.batch):
                    producer.produce("growth", value=b"x" * 600)
                producer.flush()
            records += args.step * args.batch
            used, started = cpu_s(broker.pid), time.monotonic()
            for _ in range(100):
                reader.seek(tp, records - 50)
                if not reader.poll(timeout_ms=5000):
                    raise RuntimeError("a fetch of the log's last records came back empty")
            wall, cpu = (time.monotonic() - started) / 100, (cpu_s(broker.pid) - used) / 100
            print(f"{records // args.batch:>7,} batches ({records:,} records): a fetch of the last 50 records "
                  f"{1000 * wall:.2f} ms, the broker's CPU {1e6 * cpu:,.0f} µs", flush=True)
        reader.close()
    finally:
        broker.kill()
        broker.wait()


if __name__ == "__main__":
    main()
