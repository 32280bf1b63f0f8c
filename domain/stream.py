"""What every Palette aggregate shares: its events' timestamps never go back."""

from __future__ import annotations

from typing import Any

from eventsourcing.domain import Aggregate


class Stream(Aggregate):
    """An aggregate whose new events are stamped no earlier than its last one. A command takes its
    time when it is made; decided again after another process wrote the stream first (a conflict
    between two API processes), it would be stamped before that write, and "the state as of T"
    (``projections.replay``) would no longer be a prefix of the stream."""

    def trigger_event(self, event_class: type[Any], **kwargs: Any) -> None:
        at = kwargs.get("timestamp")
        if at is not None and at < self.modified_on:
            kwargs["timestamp"] = self.modified_on
        super().trigger_event(event_class, **kwargs)
