"""DELETE /jobs/{id} cut short by a crash (the API SIGKILLed mid-request, seen live with
a crash review's script): the objects were deleted first and the job was not,
so it stayed listed as done, handing out six download links to nothing, its rerun refused, and
no process ever finished deleting it. Recorded first, a crash after the record leaves a deleted
job (404), whose objects the sweeper's late pass deletes."""

from __future__ import annotations

import httpx

from .test_bounded_resources import served_client
from .test_mask_rerun import _done_by_hand


def test_a_delete_cut_short_after_the_objects_went_leaves_no_job_pointing_at_them(settings, monkeypatch):
    from adapters.api import routes_jobs

    forget = routes_jobs._forget_job_data

    def forgot_then_killed(c, user_id, job_id):
        forget(c, user_id, job_id)
        raise RuntimeError("the process is killed here")  # what came after it never runs

    with served_client(settings) as (url, client):
        job_id = _done_by_hand(client, client.http, settings.callback_secret, 2)
        monkeypatch.setattr(routes_jobs, "_forget_job_data", forgot_then_killed)
        assert client.call("DELETE", f"/jobs/{job_id}").status_code == 500
        monkeypatch.setattr(routes_jobs, "_forget_job_data", forget)
        # a connection of its own: the server closed the one its 500 went out on
        assert httpx.get(f"{url}/jobs/{job_id}", headers=client.headers, timeout=30).status_code == 404


def test_a_delete_cut_short_after_its_record_is_finished_by_the_sweepers_late_pass(settings, monkeypatch):
    """The window the order leaves: JobDeleted recorded, the process dead before the objects and
    the webhook deliveries went. The job is 404 at once; the late pass deletes both."""
    import uuid

    from adapters.api import routes_jobs
    from adapters.retention import LATE_UPLOADS_S

    from .test_data_lifecycle import _objects
    from .test_erasure_adversarial import _ahead, _db, _sweep

    def killed(*_: object) -> None:
        raise RuntimeError("the process is killed here")  # before anything of the job's data went

    with served_client(settings) as (url, client):
        job_id = _done_by_hand(client, client.http, settings.callback_secret, 2)
        hook = client.data("POST", "/webhooks", 201, json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]})
        with _db(settings) as conn:
            conn.execute("INSERT INTO palette_webhooks.deliveries (id, endpoint_id, message_id, job_id, version, "
                         "event_type, body) VALUES (%s, %s, %s, %s, 1, 'job.finished', '{}')",
                         [uuid.uuid4(), hook["id"], f"msg_{uuid.uuid4().hex}", job_id])
        kept = _objects(settings, client.user_id)
        monkeypatch.setattr(routes_jobs, "_forget_job_data", killed)
        assert client.call("DELETE", f"/jobs/{job_id}").status_code == 500
        assert httpx.get(f"{url}/jobs/{job_id}", headers=client.headers, timeout=30).status_code == 404
    assert kept and _objects(settings, client.user_id) == kept  # nothing went with the request
    _sweep(settings, now=_ahead(LATE_UPLOADS_S + 3600))
    assert _objects(settings, client.user_id) == set()
    with _db(settings) as conn:
        assert conn.execute("SELECT count(*) FROM palette_webhooks.deliveries WHERE job_id = %s",
                            [job_id]).fetchone() == (0,)
