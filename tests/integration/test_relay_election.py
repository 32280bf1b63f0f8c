"""Several relays of one log: one publishes, the others stand by and take over when it goes."""

from __future__ import annotations

from adapters.relay import RelayState

from .test_stack import wait_until


def test_one_relay_leads_and_a_standby_takes_over_when_its_connection_ends(settings):
    url = settings.effective_database_url
    first, second = RelayState.connect(url), RelayState.connect(url)
    try:
        assert first.lead("election-test")
        assert not second.lead("election-test")
        assert first.lead("election-test")  # holding it, asking again changes nothing
        assert second.lead("another-log")  # one lock per log
        first.conn.close()  # the leader dies (or loses the database)
        wait_until(lambda: second.lead("election-test"), what="the standby to take over")
    finally:
        second.conn.close()

