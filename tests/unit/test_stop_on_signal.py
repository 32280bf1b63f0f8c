"""``palette serve``'s stop signal while the main thread holds the stop event's lock (inside
``Event.wait``/``Event.set``, or inside a handler the next signal interrupted): a handler that set
the event itself waited on its own thread for ever. Seen live: a webhooks process orphaned by a
SIGKILLed ``palette up`` hung three handlers deep in ``Event.set`` (gdb ``py-bt``), holding its
PostgreSQL sessions, so PostgreSQL never finished its shutdown and ``palette up`` could not start."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCENARIO = textwrap.dedent("""
    import os, signal, threading
    from adapters.cli.stack import stop_on_signal
    stop = threading.Event()
    signal.signal(signal.SIGTERM, stop_on_signal(stop))
    with stop._cond:  # the main thread holds the event's lock (as inside Event.wait or a handler's set)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, in this thread
    assert stop.wait(10), "the stop event was never set"
    print("stopped")
""")


def test_a_stop_signal_while_the_main_thread_holds_the_events_lock_stops_the_process() -> None:
    try:
        done = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("the signal handler deadlocked on the stop event's lock") from None
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr
