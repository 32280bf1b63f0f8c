"""The read-model probe of the lag figures, in a process of its own: the load generator's threads
share their interpreter's lock, and at 2,000 events/s held a probe polling beside them off it for
long enough to add up to ~180 ms to the p99 it reported (the same jobs, both probes, one run)."""

from __future__ import annotations

import queue
import time
from multiprocessing.queues import Queue
from typing import Any

import psycopg
from psycopg import sql

POLL_S = 0.01
ASKED = 400  # jobs asked for in one poll: the oldest and the newest half of it
WAIT_AFTER_S = 30  # once no more jobs come, how long rows are waited for
TRACKING = ("palette_read", "jobs_log_tracking")  # a job's row here: jobs_log has folded it


def poll_rows(url: str, jobs: Queue[Any], found: Queue[Any], table: tuple[str, str] = TRACKING,
              wait_after_s: float = WAIT_AFTER_S) -> None:
    """Job ids arrive on ``jobs`` (None: no more); ``found`` gets "ready" once connected, then
    lists of (job, time its row in ``table`` was first seen), and None at the end: when every
    job was seen, or ``wait_after_s`` after the last one."""
    unseen: dict[str, None] = {}  # in commit order
    closed_at = None
    query = sql.SQL("SELECT stream_id::text FROM {} WHERE stream_id = ANY(%s::uuid[])").format(sql.Identifier(*table))
    with psycopg.connect(url, autocommit=True) as conn:
        found.put("ready")
        while closed_at is None or (unseen and time.time() < closed_at + wait_after_s):
            while True:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    closed_at = time.time()
                else:
                    unseen[job] = None
            if unseen:
                # Rows arrive about in order: the probe's own load stays small however far behind.
                order = list(unseen)
                pending = order if len(order) <= ASKED else order[:ASKED // 2] + order[-ASKED // 2:]
                rows = conn.execute(query, [pending]).fetchall()
                now = time.time()
                for (job,) in rows:
                    del unseen[job]
                if rows:
                    found.put([(job, now) for (job,) in rows])
            time.sleep(POLL_S)
    found.put(None)
