"""The GPU worker: pure image ops (ops, segment, codec) apart from the Kafka/S3 loop (worker)."""
