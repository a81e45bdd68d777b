"""Workers on fake engines over one job store: takeover after a dead worker, give-up after N lost leases,
cancel from any server, on_final once, and a dead PostgreSQL (503, nothing left, nothing lost)."""
from __future__ import annotations

import asyncio
import time

import pytest

from infinitetalk.service.inputs import InputSettings
from infinitetalk.service.jobs import CANCELLED, EngineState
from infinitetalk.service.settings import read_settings
from infinitetalk.service.store import JobStore, StoreUnavailable
from infinitetalk.service.worker import Worker
from service_support import TEMPLATE, FakeEngine, body, call, post, with_worker, write_png, write_wav

SUBMIT = "/infinitetalk/v1/image-to-video-multi"
WORKFLOWS = {"image-to-video-multi": TEMPLATE, "video-to-video-multi": TEMPLATE}


def fleet(tmp_path, url: str, servers: int = 2, lease_s: float = 1.0, on_final=None):
    """`servers` services on one database and one shared input folder, each with its engine and worker."""
    inputs = tmp_path / "input"
    inputs.mkdir(exist_ok=True)
    write_wav(inputs / "left.wav", 1.0)
    write_wav(inputs / "right.wav", 0.6, freq=330)
    write_png(inputs / "two.png")
    out = []
    for i in range(servers):
        engine = FakeEngine()
        service, worker = with_worker(JobStore(url), engine, InputSettings(input_dir=inputs), WORKFLOWS,
                                      {"lease_s": lease_s, "worker_id": f"w{i}"}, on_final=on_final, cancel_wait_s=5.0)
        out.append((service, engine, worker))
    return inputs, out


async def until(fn, what: str, limit_s: float = 30.0):
    """Await `fn()` (a coroutine function) until truthy; fail after `limit_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        value = await fn()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {limit_s:.0f} s")


async def step(worker: Worker, then=None):
    """One worker tick; returns `then()` if given, else the job the worker holds."""
    await worker.tick()
    return then() if then else worker.job


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    return str(tmp_path / "jobs.sqlite3") if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def test_a_dead_workers_job_is_taken_over_and_its_late_result_is_fenced_off(tmp_path, db_url):
    finals = []
    _, [(sa, ea, wa), (sb, eb, wb)] = fleet(tmp_path, db_url, on_final=finals.append)

    async def flow(client):
        s, r = await post(client, SUBMIT, body(seed=5))
        assert s == 200, r
        job_id = r["data"]["id"]
        await wb.tick()                                  # B's engine is idle too; only one of them gets the job
        await wa.tick()
        owner, other = (wa, wb) if wa.job else (wb, wa)
        assert owner.job.id == job_id and other.job is None
        owner_engine = ea if owner is wa else eb
        owner_engine.states[owner.prompt_id] = EngineState("running", [])
        await owner.tick()
        assert (await sb.status(job_id)).status == "processing"
        # the owner dies here (no more ticks): its lease runs out and the other worker takes the job
        await until(lambda: step(other), "the takeover")
        assert other.job.id == job_id and other.job.attempts == 2
        other_engine = eb if other is wb else ea
        assert other_engine.graphs[other.prompt_id]["4"]["inputs"]["seed"] == 5   # the same resolved seed
        other_engine.finish(other.prompt_id, "taken_over.mp4")
        await other.tick()
        owner_engine.finish(owner.prompt_id, "stale.mp4")    # the "dead" worker comes back and finishes too
        await owner.tick()
        await owner.tick()
        assert owner.job is None
        return job_id
    job_id = call(sa, flow)
    final = sb.get(job_id)
    assert final.status == "completed" and [o["filename"] for o in final.outputs] == ["taken_over.mp4"]
    assert [f.id for f in finals] == [job_id]          # on_final once, from the worker that wrote the end


def test_a_job_whose_workers_keep_dying_fails_after_the_attempt_limit(tmp_path, db_url):
    finals = []
    _, servers = fleet(tmp_path, db_url, servers=4, on_final=finals.append)
    service = servers[0][0]

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job_id = r["data"]["id"]
        for attempt, (_, _, worker) in enumerate(servers[:3], start=1):   # three claims, each worker then "dies"
            await until(lambda: step(worker), f"claim {attempt}")
            assert worker.job.attempts == attempt
        last = servers[3][2]
        await until(lambda: step(last, lambda: service.get(job_id).status == "failed"), "the give-up")
        return job_id
    job_id = call(service, flow)
    rec = service.get(job_id)
    assert rec.status == "failed" and "given up after 3 attempts" in rec.error and "lease" in rec.error
    assert [f.id for f in finals] == [job_id] and finals[0].status == "failed"
    assert servers[3][1].counter == 0                 # the fourth claim never ran it


def test_cancel_from_any_server(tmp_path, db_url):
    finals = []
    _, [(sa, ea, wa), (sb, eb, wb)] = fleet(tmp_path, db_url, lease_s=30.0, on_final=finals.append)

    async def flow(client):
        ids = [(await post(client, SUBMIT, body(seed=i)))[1]["data"]["id"] for i in range(3)]
        await wa.tick()                                # A holds the first, queued but not started
        assert wa.job.id == ids[0]

        async def heartbeat_soon():
            await asyncio.sleep(0.3)
            wa._beat_at = float("-inf")                 # the next tick is a heartbeat
            await wa.tick()
        cancelled, _ = await asyncio.gather(sb.cancel(ids[0]), heartbeat_soon())  # asked on B
        assert cancelled.status == "failed" and cancelled.error == CANCELLED and wa.job is None
        assert ea.states == {}                          # removed from A's local queue
        free = await sb.cancel(ids[1])                  # never claimed: cancelled at once
        assert free.status == "failed" and free.error == CANCELLED
        await wa.tick()
        assert wa.job.id == ids[2]
        ea.states[wa.prompt_id] = EngineState("running", [])
        await wa.tick()
        with pytest.raises(Exception) as info:
            await sb.cancel(ids[2])
        assert getattr(info.value, "code", None) == 409
        return ids
    ids = call(sa, flow)
    assert sorted(f.id for f in finals) == sorted(ids[:2])


def test_lease_setting_is_checked():
    assert read_settings({}).lease_s == 60.0 and read_settings({"INFINITETALK_API_LEASE_SECONDS": "5"}).lease_s == 5.0
    for bad in ("soon", "0", "-3"):
        with pytest.raises(RuntimeError, match="INFINITETALK_API_LEASE_SECONDS"):
            read_settings({"INFINITETALK_API_LEASE_SECONDS": bad})


def test_a_dead_database_is_503_leaves_no_files_and_loses_nothing(tmp_path, postgres_server, postgres_url):
    inputs, [(service, engine, worker)] = fleet(tmp_path, postgres_url, servers=1, lease_s=3.0)
    png = "data:image/png;base64," + __import__("base64").b64encode((inputs / "two.png").read_bytes()).decode()
    job_inputs = inputs / "infinitetalk_api"

    async def flow(client):
        s, r = await post(client, SUBMIT, body(seed=3, image=png))
        job_id = r["data"]["id"]
        await worker.tick()
        pid = worker.prompt_id
        engine.states[pid] = EngineState("running", [])
        await worker.tick()
        postgres_server.stop()                          # the database goes away mid-job
        s, r = await post(client, SUBMIT, body(image=png))
        assert s == 503 and r["code"] == 503 and r["data"] is None, r
        assert "job database is unreachable" in r["message"] and "nothing was queued" in r["message"]
        assert sorted(p.name for p in job_inputs.iterdir()) == [job_id]   # the refused submit left nothing; the job's stay
        resp = await client.get(f"/infinitetalk/v1/predictions/{job_id}/status")
        assert resp.status == 503 and "status cannot be read" in (await resp.json())["message"]
        assert resp.headers.get("Retry-After")
        resp = await client.get("/infinitetalk/v1/health")                          # not ready, and why
        reply = await resp.json()
        assert resp.status == 503 and reply["message"] == "not ready: the job database is unreachable", reply
        resp = await client.get(f"/api/v3/predictions/{job_id}/result")           # the drop-in paths say the same
        assert resp.status == 503 and "status cannot be read" in (await resp.json())["message"]
        resp = await client.get(f"/v1/requests/{job_id}/status")
        reply = await resp.json()
        assert resp.status == 503 and reply["code"] == 503 and "job database is unreachable" in reply["error"]
        resp = await client.post("/api/v3/wavespeed-ai/infinitetalk/image-to-video-multi", json=body(image=png))
        assert resp.status == 503 and "nothing was queued" in (await resp.json())["message"]
        assert resp.headers.get("Retry-After")
        assert sorted(p.name for p in job_inputs.iterdir()) == [job_id]
        worker._beat_at = float("-inf")
        await worker.tick()                              # heartbeat fails: the job keeps running here
        engine.finish(pid, "done.mp4")
        await worker.tick()                              # the end cannot be written yet: kept for a retry
        assert worker._final is not None and worker._final["status"] == "completed"
        postgres_server.start()
        await worker.tick()
        resp = await client.get(f"/infinitetalk/v1/predictions/{job_id}/status")
        data = (await resp.json())["data"]
        assert resp.status == 200 and data["status"] == "completed" and data["outputs"][0].endswith("done.mp4&subfolder=infinitetalk_api&type=output")
        s, r = await post(client, SUBMIT, body())        # and the server takes new jobs again
        assert s == 200, r
        resp = await client.get("/infinitetalk/v1/health")
        assert resp.status == 200 and (await resp.json())["data"]["database"] == "ok"
        return job_id
    call(service, flow)


def test_a_taken_over_job_whose_video_was_already_saved_is_recorded_not_run_again(tmp_path):
    """The dead owner finished the video but not the record: the next claim finds the saved file."""
    _, [(sa, ea, wa), (sb, eb, wb)] = fleet(tmp_path, str(tmp_path / "jobs.sqlite3"), lease_s=1.0)
    eb.saved_outputs = lambda prefix: [{"filename": prefix.rpartition("/")[2] + "_00001_.mp4",
                                        "subfolder": "infinitetalk_api", "type": "output"}]

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job_id = r["data"]["id"]
        await wa.tick()
        assert wa.job.id == job_id                     # A runs it, then dies
        await until(lambda: step(wb, lambda: sb.get(job_id).status == "completed"), "the takeover")
        return job_id
    job_id = call(sa, flow)
    assert eb.counter == 0                             # B never ran it
    assert sb.get(job_id).outputs[0]["filename"] == f"{job_id}_00001_.mp4"


def test_cancel_on_the_server_whose_worker_holds_the_job_acts_at_once(tmp_path):
    from service_support import dispatch, make_env

    env = make_env(tmp_path)

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job_id = r["data"]["id"]
        pid = await dispatch(env, job_id)               # claimed and queued here, not started
        s, r = await post(client, f"/infinitetalk/v1/predictions/{job_id}/cancel", {})
        return s, r, pid
    status, reply, pid = call(env["service"], flow)
    assert status == 200 and reply["data"]["status"] == "failed" and reply["data"]["error"] == CANCELLED, reply
    assert pid not in env["engine"].states and env["worker"].job is None   # gone from the local queue


def test_webhook_is_checked_and_kept_and_on_final_hears_route_cancels(tmp_path):
    from infinitetalk.service.contract import ApiError

    finals = []

    def check(url: str) -> str:
        if not url.startswith("https://"):
            raise ApiError(400, f"field 'webhook': expected an https URL; got {url!r}")
        return url
    _, [(service, _, _)] = fleet(tmp_path, str(tmp_path / "jobs.sqlite3"), servers=1, on_final=finals.append)
    service.webhook_check = check

    async def main():
        with pytest.raises(ApiError) as info:
            await service.submit("image-to-video-multi", body(), webhook="http://hooks.example.com/x")
        assert info.value.code == 400 and "webhook" in info.value.message
        rec = await service.submit("image-to-video-multi", body(), webhook="https://hooks.example.com/x")
        assert service.get(rec.id).webhook == "https://hooks.example.com/x"
        await service.cancel(rec.id)
        return rec.id
    job_id = asyncio.run(main())
    assert [(f.id, f.status, f.error, f.webhook) for f in finals] == \
        [(job_id, "failed", CANCELLED, "https://hooks.example.com/x")]
    assert service.store.claim_event(job_id, "webhook", "S1", 60.0) == (0, None)   # one delivery at a time
    assert service.store.claim_event(job_id, "webhook", "S2", 60.0) is None


def test_an_upload_longer_than_the_lease_keeps_the_job(tmp_path, db_url):
    """Publishing (an S3 upload of a long video) can outlast the lease: the worker extends it meanwhile,
    so no other worker takes the job over and runs it again."""
    from infinitetalk.service.outputs import LocalOutputs

    _, [(sa, ea, wa), (sb, eb, wb)] = fleet(tmp_path, db_url, lease_s=0.6)

    class SlowUpload(LocalOutputs):
        def publish(self, job_id, engine_outputs):
            time.sleep(2.0)                               # more than three leases
            return super().publish(job_id, engine_outputs)
    sa.outputs = SlowUpload()

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job_id = r["data"]["id"]
        await wa.tick()
        ea.finish(wa.prompt_id, "clip_00001_.mp4")
        finishing = asyncio.get_running_loop().create_task(wa.tick())   # A publishes (slowly) and records
        claims = []
        while not finishing.done():
            await wb.tick()                               # B keeps trying to claim meanwhile
            claims.append(wb.job)
            await asyncio.sleep(0.1)
        await finishing
        return job_id, claims
    job_id, claims = call(sa, flow)
    assert len(claims) >= 10 and all(c is None for c in claims) and eb.graphs == {}
    rec = sa.get(job_id)
    assert rec.status == "completed" and rec.attempts == 1 and rec.outputs[0]["filename"] == "clip_00001_.mp4"


def test_health_needs_no_key_and_says_only_status_words(tmp_path):
    """For load balancers (which send no key): ready or not, the worker's state, nothing about any job."""
    _, [(service, engine, worker)] = fleet(tmp_path, str(tmp_path / "jobs.sqlite3"), servers=1)

    async def health(client):
        resp = await client.get("/infinitetalk/v1/health")
        return resp.status, (await resp.json())["data"]

    async def flow(client):
        seen = [await health(client)]
        s, r = await post(client, SUBMIT, body())
        assert s == 401, r                                 # the API itself still wants the key
        await service.submit("image-to-video-multi", body())
        await worker.tick()
        seen.append(await health(client))                  # a job on this server's engine
        return seen

    async def api_only(client):
        resp = await client.post("/infinitetalk/v1/health")
        return await health(client), resp.status
    seen = call(service, flow, keys=("k-123",))
    off, post_status = call(service, api_only, keys=("k-123",), local_worker=False)   # an API-only server
    seen.append(off)
    assert seen == [(200, {"status": "ok", "database": "ok", "worker": "idle"}),
                    (200, {"status": "ok", "database": "ok", "worker": "busy"}),
                    (200, {"status": "ok", "database": "ok", "worker": "off"})]
    assert post_status == 401                               # only GET health is open without a key


def test_a_failure_while_starting_a_claimed_job_leaves_the_worker_working(tmp_path):
    """A takeover whose saved-output check fails (an NFS hiccup): the worker lets the job go back to the queue
    and keeps claiming, instead of holding a job it never queued."""
    _, [(sa, ea, wa), (sb, eb, wb)] = fleet(tmp_path, str(tmp_path / "jobs.sqlite3"), lease_s=0.6)
    calls = []

    def flaky(prefix):
        calls.append(prefix)
        if len(calls) == 1:
            raise OSError(116, "Stale file handle")
        return []
    eb.saved_outputs = flaky

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job_id = r["data"]["id"]
        await wa.tick()                                  # A runs it, then dies
        await until(lambda: step(wb, lambda: wb.prompt_id is not None), "B queueing the job after one failed start")
        return job_id
    job_id = call(sa, flow, local_worker=False)   # A stays dead (alive again, it would give its attempt back)
    assert len(calls) == 2 and wb.job.id == job_id and sa.get(job_id).attempts == 3


def test_no_heartbeat_for_a_whole_lease_stops_the_job_here(tmp_path, postgres_server, postgres_url):
    """Cut off from the database past the lease, a worker stops its job (another server may run it now)."""
    _, [(service, engine, worker)] = fleet(tmp_path, postgres_url, servers=1, lease_s=1.0)
    dropped = []
    engine.interrupt = dropped.append

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        await worker.tick()
        pid = worker.prompt_id
        engine.states[pid] = EngineState("running", [])
        await worker.tick()
        postgres_server.stop()
        try:
            worker._beat_at = float("-inf")
            await worker.tick()                          # within the lease: it keeps the job
            assert worker.job is not None and dropped == [] and engine.states[pid].status == "running"
            await asyncio.sleep(1.1)
            worker._beat_at = float("-inf")
            await worker.tick()                          # a whole lease without a heartbeat: stopped here
            assert worker.job is None
        finally:
            postgres_server.start()
        return pid
    pid = call(service, flow)
    assert dropped == [pid] or engine.states.get(pid) is None


def test_outages_longer_than_the_lease_use_up_no_attempt(tmp_path, postgres_server, postgres_url):
    """A live worker that stops its job because the database was gone for a whole lease gives the attempt back
    once the database answers: more such outages than the attempt limit still leave the job running."""
    _, [(service, engine, worker)] = fleet(tmp_path, postgres_url, servers=1, lease_s=1.0)
    engine.interrupt = lambda pid: engine.states.pop(pid)

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job_id = r["data"]["id"]
        for outage in range(worker.max_attempts + 1):
            await until(lambda: step(worker, lambda: worker.prompt_id is not None), f"claim {outage + 1}")
            assert worker.job.id == job_id and worker.job.attempts == 1
            engine.states[worker.prompt_id] = EngineState("running", [])
            await worker.tick()
            postgres_server.stop()
            try:
                await asyncio.sleep(1.1)
                worker._beat_at = float("-inf")
                await worker.tick()                      # no heartbeat for a whole lease: stopped here
                assert worker.job is None
            finally:
                postgres_server.start()
        return job_id
    job_id = call(service, flow)
    rec = service.get(job_id)
    assert rec.status == "processing" and rec.error == "" and rec.attempts == 1, rec


def test_a_cancel_for_another_job_does_not_wait_for_this_workers_step(tmp_path):
    _, [(service, engine, worker)] = fleet(tmp_path, str(tmp_path / "jobs.sqlite3"), servers=1)

    async def main():
        async with worker._step:                         # a long step (an upload) in progress
            await asyncio.wait_for(worker.cancel_if_mine("some-other-job"), 0.5)
    asyncio.run(main())


def test_a_cancel_flag_that_came_too_late_is_cleared_when_the_job_starts(tmp_path):
    """Flagged while claimed, then ComfyUI started it anyway: a later owner (after a crash) must run it, not
    fail it as cancelled."""
    _, [(sa, ea, wa), (sb, eb, wb)] = fleet(tmp_path, str(tmp_path / "jobs.sqlite3"), lease_s=0.6)

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job_id = r["data"]["id"]
        await wa.tick()
        assert sa.store.request_cancel(job_id)           # flagged before A's heartbeat saw it
        ea.states[wa.prompt_id] = EngineState("running", [])
        await wa.tick()                                   # A records `processing`
        assert sa.get(job_id).status == "processing" and sa.get(job_id).cancel_requested == 0
        await until(lambda: step(wb, lambda: wb.prompt_id is not None), "B taking over")   # A died
        return job_id
    job_id = call(sa, flow)
    assert sb.get(job_id).status == "processing" and sb.get(job_id).error == ""


def test_an_end_recorded_but_not_readable_is_still_notified(tmp_path):
    finals = []
    _, [(service, engine, worker)] = fleet(tmp_path, str(tmp_path / "jobs.sqlite3"), servers=1, on_final=finals.append)

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        await worker.tick()
        engine.finish(worker.prompt_id, "clip_00001_.mp4")
        real_get = service.store.get

        def get(job_id):
            if worker._final is None and worker.job is None:
                raise StoreUnavailable("the job database is unreachable")   # right after the final write
            return real_get(job_id)
        service.store.get = get
        try:
            await worker.tick()
        finally:
            service.store.get = real_get
        return r["data"]["id"]
    job_id = call(service, flow)
    assert [(f.id, f.status, f.outputs[0]["filename"]) for f in finals] == [(job_id, "completed", "clip_00001_.mp4")]
    assert service.get(job_id).status == "completed"
