"""Webhooks against a real aiohttp receiver on 127.0.0.1: signature (checked here independently),
retries with backoff, giving up, no redirects, one delivery when two services end the same job, a
delivery handed on when its server dies mid-retries or before notifying, and the guard's decisions on
given addresses (no traffic to private or public hosts)."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp import web

from edge_support import SECRET, Receiver, finish_job, make_edge_env
from infinitetalk.service.contract import ApiError
from infinitetalk.service.inputs import InputSettings
from infinitetalk.service.routes import JobApi
from infinitetalk.service.settings import read_settings
from infinitetalk.service.webhooks import WebhookSender, make_webhook_check, webhook_body_for
from service_support import body


def _independent_check(headers: dict[str, str], raw: bytes) -> bool:
    """WaveSpeed's documented verification, written from the docs (not from webhooks.py)."""
    key = SECRET[len("whsec_"):].encode()
    wid, ts, sig = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    expected = hmac.new(key, wid.encode() + b"." + ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
    version, _, given = sig.partition(",")
    return version == "v3" and hmac.compare_digest(expected, given) and abs(time.time() - int(ts)) <= 300


def _sub(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def _wired(tmp_path, store_path=None, inputs=None, delays=None, environ=None, **ws):
    """A JobService whose on_final is a WebhookSender (sleep recorded, not waited); `environ`: the webhook
    settings (style, secret), else the WaveSpeed style with SECRET."""
    holder: dict = {}
    now = [1000.0]

    async def fake_sleep(seconds: float) -> None:
        (delays if delays is not None else []).append(seconds)
        now[0] += seconds

    env = make_edge_env(tmp_path, store_path=store_path, inputs=inputs,
                        webhook_check=make_webhook_check(InputSettings(input_dir=tmp_path, allow_hosts=("127.0.0.1",))))
    service = env["service"]
    configured = read_settings(environ or {"INFINITETALK_API_WEBHOOK_SECRET": SECRET})
    hooks = configured.webhooks
    sender = WebhookSender(service.store, dataclasses.replace(hooks, **ws), env["settings"],
                           body_for=webhook_body_for(service, configured.public_url, hooks.style), sleep=fake_sleep,
                           clock=lambda: now[0])
    service.on_final = sender.on_final
    holder.update(env, sender=sender)
    return holder


async def _submit_and_finish(client, env, url):
    base = str(client.make_url("")).rstrip("/")
    rec = await env["service"].submit("image-to-video-multi", body(), webhook=url, base_url=base)
    await finish_job(env, rec.id, "clip_00001_.mp4")
    return rec


async def _one_delivered_job(env):
    """Submit one job with a webhook to a receiver answering 200, finish it, and read its result:
    (record, the result route's answer, what the receiver got)."""
    async with Receiver([200]) as hook:
        client = await _app_client(env["service"])
        try:
            rec = await _submit_and_finish(client, env, hook.url)
            result = await (await client.get(f"/infinitetalk/v1/predictions/{rec.id}/result")).json()
            await env["sender"].drain()
        finally:
            await client.close()
        return rec, result, hook.received


async def _app_client(service) -> TestClient:
    app = web.Application()
    app.add_routes(JobApi(service, keys=lambda: (), is_open=lambda: False).routes())
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


def test_delivery_is_wavespeeds_flat_prediction_object_signed_like_wavespeed(tmp_path):
    env = _wired(tmp_path)

    rec, result, received = asyncio.run(_one_delivered_job(env))
    assert len(received) == 1
    headers, raw = received[0]
    assert _independent_check(headers, raw)
    assert headers["webhook-id"] == rec.id and headers["Content-Type"] == "application/json"
    delivered, data = json.loads(raw), result["data"]
    assert list(delivered)[:10] == ["id", "model", "input", "outputs", "urls", "has_nsfw_contents", "status",
                                    "created_at", "error", "timings"]     # flat, not the {code, message, data} envelope
    assert {k: v for k, v in delivered.items() if k != "input"} == data
    assert delivered["has_nsfw_contents"] == [False] and data["status"] == "completed"
    assert delivered["input"] == {**body(), "order": "left_right", "resolution": "480p", "seed": data["seed"]}
    tampered = raw.replace(b"completed", b"failed!!!")
    assert not _independent_check(headers, tampered)


def test_webhook_body_echoes_the_route_family_and_model_id_the_job_was_submitted_on(tmp_path):
    env = _wired(tmp_path)
    routes = {"wavespeed-ai/infinitetalk/image-to-video-multi": "/api/v3/predictions/{}/result",
              "community/infinite-talk/fast/multi": "/v1/requests/{}/result",
              "infinitetalk/image-to-video-multi": "/infinitetalk/v1/predictions/{}/result"}

    async def main():
        async with Receiver([200]) as hook:
            client = await _app_client(env["service"])
            try:
                ids = []
                for path in ("/api/v3/wavespeed-ai/infinitetalk/image-to-video-multi",
                             "/v1/models/community/infinite-talk/fast/multi", "/infinitetalk/v1/image-to-video-multi"):
                    reply = await (await client.post(f"{path}?webhook={hook.url}", json=body())).json()
                    ids.append(reply.get("request_id") or reply["data"]["id"])
                    await finish_job(env, ids[-1])
                await env["sender"].drain()
                base = str(client.make_url("")).rstrip("/")
            finally:
                await client.close()
            return ids, base, [json.loads(raw) for _, raw in hook.received]

    ids, base, delivered = asyncio.run(main())
    by_id = {d["id"]: d for d in delivered}
    assert sorted(by_id) == sorted(ids)
    for job_id, (model, route) in zip(ids, routes.items()):
        assert by_id[job_id]["model"] == model
        assert by_id[job_id]["urls"]["get"] == base + route.format(job_id)


def test_standard_webhooks_style_verifies_with_the_standardwebhooks_library(tmp_path):
    standardwebhooks = pytest.importorskip("standardwebhooks")
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    environ = {"INFINITETALK_API_WEBHOOK_SECRET": secret, "INFINITETALK_API_WEBHOOK_STYLE": "standard"}
    env = _wired(tmp_path, environ=environ)

    _, result, received = asyncio.run(_one_delivered_job(env))
    (headers, raw), = received
    assert headers["webhook-signature"].startswith("v1,")
    verifier = standardwebhooks.Webhook(secret)
    assert verifier.verify(raw, headers) == result            # the contract routes' envelope, verified
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(raw.replace(b"completed", b"failed!!!"), headers)
    assert not _independent_check(headers, raw)                # not WaveSpeed's form


def test_retries_after_500s_with_growing_delays_then_succeeds(tmp_path):
    delays: list[float] = []
    env = _wired(tmp_path, delays=delays, first_delay_s=1.0)

    async def main():
        async with Receiver([500, 503, 200]) as hook:
            rec = await env["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
            await finish_job(env, rec.id)
            await env["sender"].drain()
            return rec, hook.received

    rec, received = asyncio.run(main())
    assert len(received) == 3 and env["sender"].attempts[rec.id] == [500, 503, 200]
    assert len({h["webhook-id"] for h, _ in received}) == 1          # one id across retries
    assert all(_independent_check(h, raw) for h, raw in received)    # each attempt signed afresh
    assert len(delays) == 2 and 0.8 <= delays[0] <= 1.0 and 1.6 <= delays[1] <= 2.0  # 1 s, then doubled


def test_huge_answers_are_not_read_the_status_decides(tmp_path):
    """A receiver answering 700 MB (first with 500, to be retried, then 200): a few kB of each answer are read,
    the connection is closed, and the status alone decides."""
    env = _wired(tmp_path, first_delay_s=0.1)
    huge = 700 * 2**20

    async def main():
        async with Receiver([500, 200], answer_bytes=huge) as hook:
            rec = await env["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
            await finish_job(env, rec.id)
            await env["sender"].drain()
            await asyncio.sleep(0.2)   # let the receiver notice the closed connections
            return rec, hook

    rec, hook = asyncio.run(main())
    assert env["sender"].attempts[rec.id] == [500, 200] and len(hook.received) == 2
    assert 0 < env["sender"].answer_bytes <= 2 * 4096      # at most 4 kB read of each answer
    assert hook.sent < 2 * 64 * 2**20                       # the receiver could not push its answers out


def test_gives_up_after_the_attempt_limit_and_does_not_retry_4xx_or_redirects(tmp_path):
    delays: list[float] = []
    env = _wired(tmp_path, delays=delays, max_attempts=4, first_delay_s=0.5)

    async def main():
        out = {}
        for statuses in ([500], [404], [302]):
            async with Receiver(statuses) as hook:
                rec = await env["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
                await finish_job(env, rec.id)
                await env["sender"].drain()
                out[statuses[0]] = (env["sender"].attempts[rec.id], len(hook.received))
        return out

    out = asyncio.run(main())
    assert out[500] == ([500] * 4, 4) and len(delays) == 3
    assert out[404] == ([404], 1) and out[302] == ([302], 1)


def test_receiver_down_is_retried_then_given_up(tmp_path):
    from edge_support import free_port

    env = _wired(tmp_path, max_attempts=3, first_delay_s=0.5)
    url = f"http://127.0.0.1:{free_port()}/hook"   # nothing listens there

    async def main():
        rec = await env["service"].submit("image-to-video-multi", body(), webhook=url, base_url="http://x")
        await finish_job(env, rec.id)
        await env["sender"].drain()
        return env["sender"].attempts[rec.id]

    attempts = asyncio.run(main())
    assert len(attempts) == 3 and all(isinstance(a, str) and "Connect" in a for a in attempts), attempts


def test_bounded_total_time_stops_retrying(tmp_path):
    env = _wired(tmp_path, max_attempts=50, first_delay_s=10.0, total_s=20.0)

    async def main():
        async with Receiver([500]) as hook:
            rec = await env["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
            await finish_job(env, rec.id)
            await env["sender"].drain()
            return len(hook.received)

    assert asyncio.run(main()) == 2   # a first wait of 8..10 s fits in 20 s; the next (16..20 s more) would not


def test_two_services_finishing_the_same_job_deliver_once(tmp_path):
    a = _wired(_sub(tmp_path, "a"))
    b = _wired(_sub(tmp_path, "b"), store_path=a["store_path"], inputs=a["inputs"])
    b["engine"].states = a["engine"].states   # one ComfyUI queue seen by both servers

    async def main():
        async with Receiver([200]) as hook:
            rec = await a["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
            await finish_job(a, rec.id)   # a's worker records the end and notifies
            a["sender"].on_final(b["service"].get(rec.id))
            b["sender"].on_final(b["service"].get(rec.id))  # both notice the end at once
            await asyncio.gather(a["sender"].drain(), b["sender"].drain())
            await a["service"].status(rec.id)   # and a later status read changes nothing
            await a["sender"].drain()
            return hook.received

    assert len(asyncio.run(main())) == 1


def _delivery_row(store_path, job_id):
    import sqlite3

    with sqlite3.connect(store_path) as db:
        return db.execute("SELECT tries, outcome, done FROM job_events WHERE job_id = ? AND event = 'webhook'",
                          (job_id,)).fetchone()


def test_a_server_dying_mid_retries_hands_the_delivery_on(tmp_path):
    """A posts once (500) and dies in its backoff wait; once A's lease runs out B carries on with try 2."""
    lease = {"request_timeout_s": 0.5, "lease_s": 0.1, "first_delay_s": 0.1}
    a = _wired(_sub(tmp_path, "a"), **lease)
    b = _wired(_sub(tmp_path, "b"), store_path=a["store_path"], inputs=a["inputs"], **lease)
    in_wait = asyncio.Event()

    async def dies_here(seconds: float) -> None:
        in_wait.set()
        await asyncio.Event().wait()                 # never returns: the process is killed in this wait
    a["sender"].sleep = dies_here

    async def main():
        async with Receiver([500, 200]) as hook:
            rec = await a["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
            await finish_job(a, rec.id)               # A records the end and starts delivering
            await asyncio.wait_for(in_wait.wait(), 10)
            for task in list(a["sender"].tasks.values()):
                task.cancel()                         # A dies
            await asyncio.gather(*a["sender"].tasks.values(), return_exceptions=True)
            assert await b["sender"].sweep() == 0     # A's lease still runs: B leaves it alone
            await asyncio.sleep(1.0)                  # past A's lease (wait + request timeout + lease)
            assert await b["sender"].sweep() == 1
            await b["sender"].drain()
            assert await b["sender"].sweep() == 0     # delivered: never again
            return rec, hook.received

    rec, received = asyncio.run(main())
    assert len(received) == 2 and {h["webhook-id"] for h, _ in received} == {rec.id}
    assert all(_independent_check(h, raw) for h, raw in received)
    assert a["sender"].attempts[rec.id] == [500] and b["sender"].attempts[rec.id] == [200]
    assert _delivery_row(a["store_path"], rec.id) == (2, "delivered", 1)   # B went on at try 2


def test_a_job_ended_by_a_server_that_stopped_before_notifying_is_swept_up(tmp_path):
    a = _wired(_sub(tmp_path, "a"))
    b = _wired(_sub(tmp_path, "b"), store_path=a["store_path"], inputs=a["inputs"], sweep_s=0.05)
    a["service"].on_final = None                     # A stops right after recording the job's end

    async def main():
        async with Receiver([200]) as hook:
            rec = await a["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
            await finish_job(a, rec.id)
            assert hook.received == [] and a["service"].get(rec.id).status == "completed"
            sweeping = asyncio.get_running_loop().create_task(b["sender"].run())   # what every server runs
            for _ in range(200):
                if hook.received:
                    break
                await asyncio.sleep(0.02)
            await b["sender"].drain()
            await asyncio.sleep(0.2)                  # a few more sweeps: nothing more is sent
            b["sender"].stop()
            await asyncio.wait_for(sweeping, 5)
            a["sender"].on_final(a["service"].get(rec.id))   # A comes back and notifies late: no repeat
            await a["sender"].drain()
            return rec, hook.received

    rec, received = asyncio.run(main())
    assert len(received) == 1 and json.loads(received[0][1])["status"] == "completed"
    assert _delivery_row(a["store_path"], rec.id) == (1, "delivered", 1)


def test_a_failed_or_cancelled_job_is_notified_too(tmp_path):
    env = _wired(tmp_path)

    async def main():
        async with Receiver([200]) as hook:
            rec = await env["service"].submit("image-to-video-multi", body(), webhook=hook.url, base_url="http://x")
            await env["service"].cancel(rec.id)
            await env["sender"].drain()
            return hook.received

    [(headers, raw)] = asyncio.run(main())
    data = json.loads(raw)
    assert data["status"] == "failed" and data["error"] == "cancelled by the client" and _independent_check(headers, raw)


def fixed(*addresses):
    return lambda host, port: list(addresses)


@pytest.mark.parametrize("url,addresses,allow,ok,why", [
    ("https://hooks.example/h", ("93.184.216.34",), (), True, ""),
    ("https://hooks.example/h", ("10.0.0.5",), (), False, "private"),
    ("http://127.0.0.1:8080/h", ("127.0.0.1",), (), False, "loopback"),
    ("http://127.0.0.1:8080/h", ("127.0.0.1",), ("127.0.0.1",), True, ""),
    ("https://meta.example/h", ("169.254.169.254",), (), False, "link-local"),
    ("ftp://hooks.example/h", ("93.184.216.34",), (), False, "scheme"),
    ("https://user:pw@hooks.example/h", ("93.184.216.34",), (), False, "credentials"),
])
def test_guard_decisions_without_traffic(tmp_path, url, addresses, allow, ok, why):
    check = make_webhook_check(InputSettings(input_dir=tmp_path, allow_hosts=allow, resolver=fixed(*addresses)))
    if ok:
        assert check(url) == url
    else:
        with pytest.raises(ApiError) as info:
            check(url)
        assert info.value.code == 400 and "webhook" in info.value.message and why in info.value.message


def test_bad_webhook_is_refused_at_submit_and_nothing_is_queued(tmp_path):
    env = _wired(tmp_path)

    async def main():
        with pytest.raises(ApiError) as info:
            await env["service"].submit("image-to-video-multi", body(), webhook="ftp://x/h")
        return info.value

    err = asyncio.run(main())
    assert err.code == 400 and "webhook" in err.message and env["engine"].graphs == {}
    plain = make_edge_env(_sub(tmp_path, "p"))

    async def no_secret():
        with pytest.raises(ApiError) as info:
            await plain["service"].submit("image-to-video-multi", body(), webhook="https://x.example/h")
        return info.value

    err = asyncio.run(no_secret())
    assert err.code == 400 and "INFINITETALK_API_WEBHOOK_SECRET" in err.message


def test_build_from_environment_wires_s3_off_and_webhooks_on(tmp_path):
    from infinitetalk.service.outputs import LocalOutputs
    from infinitetalk.service.app import build
    from infinitetalk.service.store import JobRecord, JobStore
    from service_support import TEMPLATE, FakeEngine

    settings = InputSettings(input_dir=tmp_path, allow_hosts=("127.0.0.1",))
    app = build(read_settings({"INFINITETALK_API_WEBHOOK_SECRET": SECRET, "INFINITETALK_API_PUBLIC_URL": "https://api.example/"}),
                lambda: JobStore(tmp_path / "j.sqlite3"), FakeEngine(), settings, {"image-to-video-multi": TEMPLATE}, tmp_path)
    service = app.service
    assert isinstance(service.outputs, LocalOutputs) and service.on_final == app.webhooks.on_final
    built = app.webhooks.body_for
    rec = JobRecord(id="j1", model="m", request={"seed": 1}, status="completed", created_at="t",
                    outputs=[{"filename": "a.mp4", "subfolder": "s", "type": "output"}])
    assert built(rec)["outputs"] == ["https://api.example/view?filename=a.mp4&subfolder=s&type=output"]
    with pytest.raises(RuntimeError) as info:
        build(read_settings({"INFINITETALK_API_S3_BUCKET": "UPPER"}), lambda: JobStore(tmp_path / "k.sqlite3"),
              FakeEngine(), settings, {}, tmp_path)
    assert "INFINITETALK_API_S3_BUCKET" in str(info.value)
    assert not (tmp_path / "k.sqlite3").exists()    # a bad setting is found before the database is opened


def test_secret_setting():
    assert read_settings({}).webhooks is None
    assert read_settings({"INFINITETALK_API_WEBHOOK_SECRET": SECRET}).webhooks.secret == SECRET
    with pytest.raises(RuntimeError) as info:
        read_settings({"INFINITETALK_API_WEBHOOK_SECRET": "whsec_short"})
    assert "INFINITETALK_API_WEBHOOK_SECRET" in str(info.value) and "expected" in str(info.value)
    standard = {"INFINITETALK_API_WEBHOOK_STYLE": "standard"}
    assert read_settings({**standard, "INFINITETALK_API_WEBHOOK_SECRET": "whsec_" + "QUJD" * 8}).webhooks.style == "standard"
    for bad in ({**standard, "INFINITETALK_API_WEBHOOK_SECRET": "whsec_not base64!!"},
                {**standard, "INFINITETALK_API_WEBHOOK_SECRET": "whsec_QUJD"},          # 3 bytes
                {"INFINITETALK_API_WEBHOOK_STYLE": "svix", "INFINITETALK_API_WEBHOOK_SECRET": SECRET}):
        with pytest.raises(RuntimeError) as info:
            read_settings(bad)
        assert "INFINITETALK_API_WEBHOOK_" in str(info.value) and "expected" in str(info.value) or "base64" in str(info.value)
