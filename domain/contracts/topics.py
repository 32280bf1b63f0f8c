"""Kafka topic names and consumer groups."""

from __future__ import annotations

EVENTS = "palette.events"  # the relay's envelopes, key = stream id
GPU_TASKS = "palette.gpu-jobs"  # the dispatcher's tasks, key = job id
GPU_DLQ = "palette.gpu-jobs.dlq"  # tasks the worker cannot parse or handle
DISPATCHER_DLQ = "palette.events.dispatcher-dlq"  # events the dispatcher cannot turn into tasks

ALL = (EVENTS, GPU_TASKS, GPU_DLQ, DISPATCHER_DLQ)  # created at start-up

PROJECTOR_GROUP = "palette-projections"
DISPATCHER_GROUP = "palette-dispatcher"
GPU_GROUP = "palette-gpu"  # its committed offsets say what the GPU workers consumed
WEBHOOKS_GROUP = "palette-webhooks"
EVENTS_GROUPS = (PROJECTOR_GROUP, DISPATCHER_GROUP, WEBHOOKS_GROUP)  # every group that reads EVENTS
