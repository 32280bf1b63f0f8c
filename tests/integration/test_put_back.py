"""tests/put_back.py against the live projector: a read-model row a test edits by hand ends as
the log says, even when the projector folds the row's stream on while it is edited."""

from __future__ import annotations

from typing import Any

from projections.models.jobs_log import JOBS_LOG
from projections.replay import Replayer
from tests.integration.test_dispatcher_hardening import running_job
from tests.put_back import rows_refolded

from .test_stack import wait_until


def _row(conn: Any, job_id: Any) -> tuple[Any, ...] | None:
    return conn.execute("SELECT status, done_items, failed_items, version FROM palette_read.jobs_log WHERE id = %s",
                        [job_id]).fetchone()


def test_a_row_the_projector_folds_on_while_it_is_edited_ends_as_the_log_says(apps, service, conn):
    job_id = running_job(service, conn)  # 3 items, item 1 done: running
    with rows_refolded(conn, service.app, JOBS_LOG, [job_id]):
        conn.execute("UPDATE palette_read.jobs_log SET status = 'uploaded', done_items = 0 WHERE id = %s", [job_id])
        service.record_item_result(job_id, 0, "done", f"{job_id}:0")
        version = len(list(Replayer(service.app).stream(job_id)))
        wait_until(lambda: (_row(conn, job_id) or (None,) * 4)[3] == version, what="the item folded")
        assert _row(conn, job_id) == ("uploaded", 1, 0, version)  # folded on top of the edit: apart from the log
    assert _row(conn, job_id) == ("running", 2, 0, version)  # the job's two items done, as its events say


def test_a_row_put_in_another_ones_place_is_folded_again(apps, service, conn):
    job_id = running_job(service, conn)
    version = len(list(Replayer(service.app).stream(job_id)))
    with rows_refolded(conn, service.app, JOBS_LOG, [job_id]):
        conn.execute("DELETE FROM palette_read.jobs_log WHERE id = %s", [job_id])
        conn.execute("INSERT INTO palette_read.jobs_log (id, user_id, status, preset, total_items, done_items, "
                     "failed_items, cost_estimate, created_at, updated_at, version) "
                     "SELECT %s, user_id, 'done', preset, 3, 3, 0, 3, created_at, updated_at, 9 "
                     "FROM palette_read.jobs_log LIMIT 1", [job_id])
    assert _row(conn, job_id) == ("running", 1, 0, version)
