"""The WaveSpeed and RunComfy drop-in routes through the in-process API on 127.0.0.1 (fake engine),
and the official `wavespeed` SDK, unmodified but its base URL, running a job end to end against it."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer

from edge_support import make_edge_env
from infinitetalk.service import uploads
from infinitetalk.service.compat import ROUTES as COMPAT_ROUTES
from infinitetalk.service.jobs import EngineState
from infinitetalk.service.routes import JobApi
from service_support import KEY, WORKERS, FakeEngine, body, dispatch, settle, write_wav

AUTH = {"Authorization": f"Bearer {KEY}"}
WS = "/api/v3/wavespeed-ai/infinitetalk"


class AutoEngine(FakeEngine):
    """Each state read moves a job on: queued -> running -> completed (a video named after the prompt)."""

    def state(self, prompt_id: str) -> EngineState:
        st = super().state(prompt_id)
        if st.status == "queued":
            self.states[prompt_id] = EngineState("running", [])
        elif st.status == "running":
            self.finish(prompt_id, f"{prompt_id}_00001_.mp4")
        return st


@pytest.fixture()
def env(tmp_path):
    return make_edge_env(tmp_path)


def serve(service, flow, keys=(KEY,), worker_runs: bool = False, **api):
    """`flow(client)` against the API on 127.0.0.1; `worker_runs`: the service's worker runs meanwhile (as on a
    server), else the test steps it itself (service_support.dispatch / settle); `api`: more JobApi settings."""
    async def main():
        app = web.Application(client_max_size=200 * 2**20)
        worker = WORKERS[service]
        app.add_routes(JobApi(service, keys=lambda: tuple(keys), is_open=lambda: False, worker=worker,
                              **api).routes())
        runner = asyncio.get_running_loop().create_task(worker.run()) if worker_runs else None
        try:
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                return await flow(client)
        finally:
            if runner is not None:
                worker.stop()
                await runner
    return asyncio.run(main())


async def _json(resp):
    return resp.status, await resp.json()


def test_wavespeed_submit_and_result_shapes(env):
    async def flow(client):
        s1, sub = await _json(await client.post(f"{WS}/image-to-video-multi", json=body(), headers=AUTH))
        s2, vid = await _json(await client.post(f"{WS}/video-to-video-multi", json=body(), headers=AUTH))
        job = sub["data"]["id"]
        env["engine"].finish(await dispatch(env, job), "clip_00001_.mp4")
        await settle(env)
        s3, res = await _json(await client.get(f"/api/v3/predictions/{job}/result", headers=AUTH))
        s4, missing = await _json(await client.get("/api/v3/predictions/nope/result", headers=AUTH))
        s5, noauth = await _json(await client.get(f"/api/v3/predictions/{job}/result"))
        return (s1, sub), (s2, vid), (s3, res), (s4, missing), (s5, noauth), str(client.make_url(""))

    (s1, sub), (s2, vid), (s3, res), (s4, missing), (s5, noauth), base = serve(env["service"], flow)
    assert s1 == 200 and sub["code"] == 200 and sub["data"]["status"] == "created"
    assert sub["data"]["model"] == "wavespeed-ai/infinitetalk/image-to-video-multi"    # the id the client used
    assert sub["data"]["has_nsfw_contents"] == [] and res["data"]["has_nsfw_contents"] == [False]
    assert res["data"]["model"] == "wavespeed-ai/infinitetalk/image-to-video-multi"
    assert sub["data"]["urls"]["get"] == f"{base.rstrip('/')}/api/v3/predictions/{sub['data']['id']}/result"
    assert s2 == 400 and "image" in vid["message"] and vid["data"] is None  # the video route wants `video`
    assert s3 == 200 and res["data"]["status"] == "completed" and res["data"]["outputs"][0].endswith(
        "/view?filename=clip_00001_.mp4&subfolder=infinitetalk_api&type=output")
    assert s4 == 404 and missing["code"] == 404 and "nope" in missing["message"]
    assert s5 == 401 and noauth["code"] == 401


def test_unknown_wavespeed_models_and_wrong_methods_answer_v3_json(env):
    async def flow(client):
        out = []
        for method, path in (("POST", "/api/v3/wavespeed-ai/wan-2.2/image-to-video"),
                             ("POST", "/api/v3/wavespeed-ai/infinitetalk/image-to-video"),
                             ("GET", f"{WS}/image-to-video-multi"),
                             ("POST", "/api/v3/predictions/abc/result"),
                             ("GET", "/api/v3/nothing")):
            resp = await client.request(method, path, json=body(), headers=AUTH)
            out.append((resp.status, resp.content_type, await resp.json()))
        noauth = await client.post("/api/v3/wavespeed-ai/wan-2.2/image-to-video", json=body())
        return out, noauth.status
    out, noauth = serve(env["service"], flow)
    assert [(status, ctype) for status, ctype, _ in out] == [(404, "application/json")] * 2 + \
        [(405, "application/json")] * 2 + [(404, "application/json")]
    assert all(reply["code"] == status and reply["data"] is None for status, _, reply in out)
    assert "wavespeed-ai/wan-2.2/image-to-video" in out[0][2]["message"]
    assert "wavespeed-ai/infinitetalk/image-to-video-multi" in out[0][2]["message"]   # says what is served
    assert "use POST" in out[2][2]["message"] and "use GET" in out[3][2]["message"]
    assert noauth == 401 and env["engine"].graphs == {}


def test_enable_sync_mode_answers_the_final_envelope(tmp_path, monkeypatch):
    env = make_edge_env(tmp_path, engine=AutoEngine())
    monkeypatch.setattr("infinitetalk.service.compat.SYNC_POLL_S", 0.01)

    async def flow(client):
        return await _json(await client.post(f"{WS}/image-to-video-multi", json={**body(), "enable_sync_mode": True},
                                             headers=AUTH))

    status, reply = serve(env["service"], flow, worker_runs=True)
    assert status == 200 and reply["data"]["status"] == "completed" and len(reply["data"]["outputs"]) == 1


def test_enable_sync_mode_times_out_with_the_sdk_wording(env, monkeypatch):
    monkeypatch.setattr("infinitetalk.service.compat.SYNC_POLL_S", 0.05)

    async def flow(client):
        ok = await _json(await client.post(f"{WS}/image-to-video-multi", json={**body(), "enable_sync_mode": True},
                                           headers=AUTH))
        bad = await _json(await client.post(f"{WS}/image-to-video-multi", json={**body(), "enable_sync_mode": "yes"},
                                            headers=AUTH))
        return ok, bad

    (status, reply), (bad_status, bad) = serve(env["service"], flow, sync_wait_s=0.2)
    assert status == 200 and reply["data"]["status"] == "created"
    assert "Sync mode timed out" in reply["data"]["error"] and reply["data"]["id"] in reply["data"]["error"]
    assert bad_status == 400 and "enable_sync_mode" in bad["message"]


def _form(name: str, data: bytes, field: str = "file") -> FormData:
    form = FormData()
    form.add_field(field, data, filename=name, content_type="application/octet-stream")
    return form


def test_binary_upload_then_submit_resolves_locally_without_fetching(tmp_path):
    env = make_edge_env(tmp_path)
    env["service"].settings.allow_hosts = ()   # a real fetch of 127.0.0.1 would now be refused by the guard
    wav = (env["inputs"] / "left.wav").read_bytes()

    async def flow(client):
        status, up = await _json(await client.post("/api/v3/media/upload/binary", data=_form("my voice.WAV", wav),
                                                   headers=AUTH))
        assert status == 200, up
        url = up["data"]["download_url"]
        got = await client.get(url.replace(str(client.make_url("")).rstrip("/"), ""), headers=AUTH)
        s2, sub = await _json(await client.post(f"{WS}/image-to-video-multi", json=body(left_audio=url), headers=AUTH))
        gone = url.replace(url.split("/")[-2], "0" * 32)
        s3, bad = await _json(await client.post(f"{WS}/image-to-video-multi", json=body(left_audio=gone), headers=AUTH))
        await dispatch(env, sub["data"]["id"])
        return up["data"], (got.status, await got.read()), (s2, sub), (s3, bad)

    up, got, (s2, sub), (s3, bad) = serve(env["service"], flow)
    assert up["type"] == "audio" and up["filename"] == "my_voice.wav" and up["size"] == len(wav)
    assert got == (200, wav)
    assert s2 == 200, sub
    graph = env["engine"].graphs[env["service"].get(sub["data"]["id"]).prompt_id]
    local = env["inputs"] / graph["2"]["inputs"]["left_audio"]
    assert local.read_bytes() == wav and local.parent.name == sub["data"]["id"]  # the job's own copy
    assert s3 == 400 and "left_audio" in bad["message"] and "no uploaded file" in bad["message"]


def test_upload_refusals(env, monkeypatch):
    monkeypatch.setitem(uploads.CAPS, "audio", 1000)

    async def flow(client):
        out = []
        out.append(await _json(await client.post("/api/v3/media/upload/binary", data=_form("x.exe", b"MZ"), headers=AUTH)))
        out.append(await _json(await client.post("/api/v3/media/upload/binary", data=_form("a.wav", b"\0" * 1001),
                                                 headers=AUTH)))
        out.append(await _json(await client.post("/api/v3/media/upload/binary", data=_form("a.wav", b"x", "other"),
                                                 headers=AUTH)))
        out.append(await _json(await client.post("/api/v3/media/upload/binary", json={"file": "x"}, headers=AUTH)))
        out.append(await _json(await client.post("/api/v3/media/upload/binary", data=_form("a.wav", b"x"))))
        out.append(await _json(await client.post("/api/v3/media/uploads", json={"filename": "a.wav", "size": 5000},
                                                 headers=AUTH)))
        out.append(await _json(await client.post("/api/v3/media/uploads", json={"filename": "a.wav", "size": "5"},
                                                 headers=AUTH)))
        out.append(await _json(await client.post("/infinitetalk/v1/uploads/" + "a" * 32 + "/a.wav", headers=AUTH)))
        return out

    exe, big, nofield, notmultipart, noauth, bigticket, badsize, post_upload = serve(env["service"], flow)
    assert exe[0] == 400 and ".exe" in exe[1]["message"]
    assert big[0] == 413 and "limit" in big[1]["message"]
    assert nofield[0] == 400 and "'file'" in nofield[1]["message"]
    assert notmultipart[0] == 400 and "multipart" in notmultipart[1]["message"]
    assert noauth[0] == 401
    assert bigticket[0] == 413 and "size" in bigticket[1]["message"]
    assert badsize[0] == 400 and "size" in badsize[1]["message"]
    assert post_upload[0] == 405 and "GET or PUT" in post_upload[1]["message"]
    left = list(uploads.uploads_root(env["settings"]).glob("*/*")) if uploads.uploads_root(env["settings"]).exists() else []
    assert [p for p in left if not p.name.startswith(".ticket")] == []   # nothing half-written stays


def test_ticket_upload_is_one_time_and_token_bound(env):
    data = (env["inputs"] / "right.wav").read_bytes()

    async def flow(client):
        base = str(client.make_url("")).rstrip("/")
        _, t = await _json(await client.post("/api/v3/media/uploads", json={"filename": "r.wav", "size": len(data),
                                                                           "content_type": "audio/wav"}, headers=AUTH))
        put_url = t["data"]["upload"]["url"].replace(base, "")
        wrong = await client.put(put_url.split("?")[0] + "?token=nope", data=data)
        short = await client.put(put_url, data=data[:-1])
        _, t2 = await _json(await client.post("/api/v3/media/uploads", json={"filename": "r.wav", "size": len(data)},
                                              headers=AUTH))
        put2 = t2["data"]["upload"]["url"].replace(base, "")
        ok = await client.put(put2, data=data)
        again = await client.put(put2, data=data)
        fetched = await client.get(t2["data"]["download_url"].replace(base, ""), headers=AUTH)
        return t["data"], wrong.status, short.status, ok.status, again.status, await fetched.read()

    ticket, wrong, short, ok, again, fetched = serve(env["service"], flow)
    assert ticket["upload"]["method"] == "PUT" and ticket["upload"]["headers"] == {"Content-Type": "audio/wav"}
    assert wrong == 403 and short == 400 and ok == 200 and again == 404 and fetched == data


def test_runcomfy_status_words_result_and_cancel(env):
    kinds = []
    real_submit = env["service"].submit

    async def spy(kind, payload, **kw):
        kinds.append(kind)
        return await real_submit(kind, payload, **kw)
    env["service"].submit = spy

    async def flow(client):
        rc = "/v1/models/community/infinite-talk/fast/multi"
        _, sub = await _json(await client.post(rc, json=body(), headers=AUTH))
        job = sub["request_id"]
        pid = await dispatch(env, job)
        words = [(await _json(await client.get(f"/v1/requests/{job}/status", headers=AUTH)))[1]["status"]]
        env["engine"].states[pid] = EngineState("running", [])
        await settle(env)
        words.append((await _json(await client.get(f"/v1/requests/{job}/status", headers=AUTH)))[1]["status"])
        env["engine"].finish(pid, "clip_00001_.mp4")
        await settle(env)
        words.append((await _json(await client.get(f"/v1/requests/{job}/status", headers=AUTH)))[1]["status"])
        _, result = await _json(await client.get(f"/v1/requests/{job}/result", headers=AUTH))
        late = await _json(await client.post(f"/v1/requests/{job}/cancel", headers=AUTH))
        as_video = await _json(await client.post(rc, json=body(image=None, video="two.png"), headers=AUTH))
        _, sub2 = await _json(await client.post(rc, json=body(), headers=AUTH))
        cancel = await _json(await client.post(f"/v1/requests/{sub2['request_id']}/cancel", headers=AUTH))
        after = await _json(await client.get(f"/v1/requests/{sub2['request_id']}/status", headers=AUTH))
        bad = await _json(await client.post(rc, json=body(left_audio=None), headers=AUTH))
        return sub, words, result, late, as_video, sub2, cancel, after, bad

    sub, words, result, late, as_video, sub2, cancel, after, bad = serve(env["service"], flow)
    assert set(sub) == {"request_id", "status_url", "result_url", "cancel_url"}
    assert sub["status_url"].endswith(f"/v1/requests/{sub['request_id']}/status")
    assert words == ["in_queue", "in_progress", "completed"]
    assert result["status"] == "completed" and result["outputs"]["video"].endswith("filename=clip_00001_.mp4"
                                                                                   "&subfolder=infinitetalk_api&type=output")
    assert result["error"] is None
    assert late[0] == 409 and "already ended" in late[1]["error"]
    assert kinds[:3] == ["image-to-video-multi", "video-to-video-multi", "image-to-video-multi"]  # `video` picks v2v
    assert cancel == (200, {"request_id": sub2["request_id"], "status": "cancelled"})
    assert after[1]["status"] == "cancelled"
    assert bad[0] == 400 and "left_audio" in bad[1]["error"]


def test_runcomfy_in_queue_status_carries_the_queue_position(env):
    async def flow(client):
        rc = "/v1/models/community/infinite-talk/fast/multi"
        ids = [(await _json(await client.post(rc, json=body(), headers=AUTH)))[1]["request_id"] for _ in range(3)]

        async def positions():
            out = []
            for job in ids:
                _, st = await _json(await client.get(f"/v1/requests/{job}/status", headers=AUTH))
                out.append((st["status"], st.get("queue_position")))
            return out
        before = await positions()
        pid = await dispatch(env, ids[0])
        env["engine"].states[pid] = EngineState("running", [])
        await settle(env)
        return before, await positions()

    before, after = serve(env["service"], flow)
    assert before == [("in_queue", 0), ("in_queue", 1), ("in_queue", 2)]
    assert after == [("in_progress", None), ("in_queue", 0), ("in_queue", 1)]


def test_wavespeed_sdk_uploads_and_runs_a_job(tmp_path):
    """The official SDK, unmodified but its base URL, against the in-process API with a fake engine."""
    wavespeed = pytest.importorskip("wavespeed")
    env = make_edge_env(tmp_path, engine=AutoEngine())
    env["service"].settings.allow_hosts = ()   # uploads must resolve locally, not over HTTP
    media = Path(tmp_path / "client")
    media.mkdir()
    write_wav(media / "left voice.wav", 0.8)
    image_path = env["inputs"] / "two.png"

    def client_side(base: str):
        client = wavespeed.Client(api_key=KEY, base_url=base, retry_interval=0.01)
        image = client.upload(str(image_path))
        left = client.upload(str(media / "left voice.wav"))
        with open(env["inputs"] / "right.wav", "rb") as stream:
            right = client.upload(stream)
        out = client.run("wavespeed-ai/infinitetalk/image-to-video-multi",
                         {"image": image, "left_audio": left, "right_audio": right, "prompt": "two friends"},
                         poll_interval=0.05, timeout=60)
        sync = client.run("wavespeed-ai/infinitetalk/image-to-video-multi",
                          {"image": image, "left_audio": left, "right_audio": right}, enable_sync_mode=True, timeout=60)
        return image, out, sync

    async def flow(client):
        base = str(client.make_url("")).rstrip("/")
        return await asyncio.get_running_loop().run_in_executor(None, client_side, base)

    import infinitetalk.service.compat as compat
    compat.SYNC_POLL_S, saved = 0.02, compat.SYNC_POLL_S
    try:
        image, out, sync = serve(env["service"], flow, worker_runs=True)
    finally:
        compat.SYNC_POLL_S = saved
    assert "/infinitetalk/v1/uploads/" in image and image.endswith("/two.png")
    assert len(out["outputs"]) == 1 and "/view?filename=prompt-1_00001_.mp4" in out["outputs"][0]
    assert len(sync["outputs"]) == 1 and "prompt-2_00001_.mp4" in sync["outputs"][0]
    graph = env["service"].engine.graphs["prompt-1"]
    assert (env["inputs"] / graph["1"]["inputs"]["image"]).read_bytes() == image_path.read_bytes()


def _sampler(graph: dict) -> dict:
    return next(n["inputs"] for n in graph.values() if n["class_type"] == "InfiniteTalkMultiSampler")


def test_the_fast_tier_routes_run_turbo_and_the_standard_ones_the_workflows_own_settings(env):
    """RunComfy's fast/multi and WaveSpeed's infinitetalk-fast routes queue the turbo preset (4 steps, guidance
    off); the standard route keeps the shipped workflow's sampler settings; the native route takes `tier`."""
    routes = {"ws": f"{WS}/image-to-video-multi", "ws_fast": f"{WS}-fast/image-to-video-multi",
              "rc_fast": "/v1/models/community/infinite-talk/fast/multi",
              "native_fast": "/infinitetalk/v1/image-to-video-multi"}

    async def flow(client):
        out = {}
        for name, path in routes.items():
            payload = body()
            if name == "native_fast":
                payload["tier"] = "fast"
            resp = await client.post(path, json=payload, headers=AUTH)
            got = await resp.json()
            assert resp.status == 200, (name, got)
            job = got.get("request_id") or got["data"]["id"]
            out[name] = (resp.status, got, env["engine"].graphs[await dispatch(env, job)])
            env["engine"].finish(env["worker"].prompt_id, "clip_00001_.mp4")
            await settle(env)
        bad = await client.post(routes["native_fast"], json={**body(), "tier": "turbo"}, headers=AUTH)
        return out, (bad.status, await bad.json())

    out, bad = serve(env["service"], flow)
    template = _sampler(env["service"].workflows["image-to-video-multi"])
    assert _sampler(out["ws"][2]) == {**_sampler(out["ws"][2]), "preset": template["preset"],
                                      "steps": template["steps"]}
    for name in ("ws_fast", "rc_fast", "native_fast"):
        sampler = _sampler(out[name][2])
        assert (sampler["preset"], sampler["steps"], sampler["text_guidance"], sampler["audio_guidance"]) == \
            ("turbo", 4, 1.0, 1.0), name
    # a WaveSpeed answer echoes the model id the client used; the job itself is on the fast tier's model
    assert out["ws_fast"][1]["data"]["model"] == "wavespeed-ai/infinitetalk-fast/image-to-video-multi"
    assert out["ws"][1]["data"]["model"] == "wavespeed-ai/infinitetalk/image-to-video-multi"
    assert env["service"].store.get(out["ws_fast"][1]["data"]["id"]).model == "infinitetalk-fast/image-to-video-multi"
    assert bad[0] == 400 and "tier" in str(bad[1])
    assert ("POST", "/api/v3/wavespeed-ai/infinitetalk-fast/video-to-video-multi") in COMPAT_ROUTES
