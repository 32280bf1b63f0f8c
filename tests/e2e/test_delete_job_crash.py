"""DELETE /jobs/{id} cut short by a crash (the API SIGKILLed mid-request, seen live with
/tmp/s27/crash_exp/exp_h_delete_job.py): the objects were deleted first and the job was not,
so it stayed listed as done, handing out six download links to nothing, its rerun refused, and
no process ever finished deleting it. Recorded first, a crash after the record leaves a deleted
job (404), whose objects the sweeper's late pass deletes."""

from __future__ import annotations

import httpx

from .test_mask_rerun import _done_by_hand


def test_a_delete_cut_short_after_the_objects_went_leaves_no_job_pointing_at_them(settings, monkeypatch):
    from adapters.api import routes_jobs
    from adapters.bootstrap import build

    from .conftest import Client
    from .test_bounded_resources import served

    forget = routes_jobs._forget_job_data

    def forgot_then_killed(c, user_id, job_id):
        forget(c, user_id, job_id)
        raise RuntimeError("the process is killed here")  # what came after it never runs

    container = build(settings, pool_size=2)
    try:
        with served(container) as url, httpx.Client(base_url=url, timeout=30) as http:
            client = Client(http)
            job_id = _done_by_hand(client, http, settings.callback_secret, 2)
            monkeypatch.setattr(routes_jobs, "_forget_job_data", forgot_then_killed)
            assert client.call("DELETE", f"/jobs/{job_id}").status_code == 500
            monkeypatch.setattr(routes_jobs, "_forget_job_data", forget)
            # a connection of its own: the server closed the one its 500 went out on
            assert httpx.get(f"{url}/jobs/{job_id}", headers=client.headers, timeout=30).status_code == 404
    finally:
        container.close()
