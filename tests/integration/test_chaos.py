"""The short chaos run (``make chaos`` runs the long one): a stack of its own under client load
while processes are SIGKILLed every 1-5 s (the webhook consumer among them), the broker dies and
PostgreSQL stops immediately; some clients' users receive webhooks."""

from __future__ import annotations

from tests import chaos, figures


def test_short_chaos_loses_nothing_and_does_nothing_twice() -> None:
    report = chaos.run(minutes=0.75, seed=11, workers=2, pg_stops=1, say=lambda _: None)
    figures.add("chaos seconds (short run, 0 lost)", int(report.minutes * 60))
    figures.add("chaos SIGKILLs (short run)", sum(report.kills.values()))
    figures.add("chaos PostgreSQL immediate stops (short run)", report.pg_stops)
    figures.add("chaos webhooks expected and received (short run)", report.webhooks_expected)
    assert not report.problems, report.summary() + "\n" + "\n".join(report.problems[:20])
    assert sum(report.kills.values()) >= 8 and report.pg_stops == 1
    assert report.jobs >= 10 and report.statuses["done"] >= 5, report.summary()
    assert report.kills["webhooks"] >= 1 and report.hooked_jobs >= 3, report.summary()
    assert report.webhook_receipts >= report.webhooks_expected >= 10, report.summary()
