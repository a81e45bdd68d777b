"""The job API end to end over HTTP on 127.0.0.1, with a fake engine in place of ComfyUI's queue."""
from __future__ import annotations

import asyncio
import base64

import pytest

from infinitetalk.service.contract import ApiError, billed_seconds, validate_request
from infinitetalk.service.jobs import EngineState
from infinitetalk.service.store import JobStore
from service_support import KEY, TEMPLATE, body, call, dispatch, make_env, post, settle, write_long_wav


@pytest.fixture()
def env(tmp_path):
    return make_env(tmp_path)


def test_validation_refusals_name_the_field():
    cases = [
        ({"left_audio": "a", "right_audio": "b"}, "image"),
        ({"image": "i", "right_audio": "b"}, "left_audio"),
        ({"image": "i", "left_audio": "a", "right_audio": "b", "order": "both"}, "order"),
        ({"image": "i", "left_audio": "a", "right_audio": "b", "resolution": "1080p"}, "resolution"),
        ({"image": "i", "left_audio": "a", "right_audio": "b", "seed": 2**31}, "seed"),
        ({"image": "i", "left_audio": "a", "right_audio": "b", "seed": -2}, "seed"),
        ({"image": "i", "left_audio": "a", "right_audio": "b", "seed": 1.5}, "seed"),
        ({"image": "i", "left_audio": "a", "right_audio": "b", "seed": True}, "seed"),
        ({"image": "i", "left_audio": "a", "right_audio": "b", "video": "v"}, "video"),
        ({"image": 5, "left_audio": "a", "right_audio": "b"}, "image"),
    ]
    for payload, field in cases:
        with pytest.raises(ApiError) as info:
            validate_request("image-to-video-multi", payload)
        assert info.value.code == 400 and field in info.value.message


def test_defaults_follow_the_contract():
    assert validate_request("image-to-video-multi", body()).order == "left_right"
    req = validate_request("video-to-video-multi", {"video": "v.mp4", "left_audio": "a", "right_audio": "b"})
    assert (req.order, req.resolution, req.seed) == ("meanwhile", "480p", -1)


def test_prompt_list_is_one_prompt_per_window_in_the_newline_form():
    base = {"image": "i", "left_audio": "a", "right_audio": "b"}
    req = validate_request("image-to-video-multi", {**base, "prompt": ["They greet.", " She laughs. "]})
    assert req.prompt == "They greet.\nShe laughs."
    for bad in ([], ["ok", ""], ["two\nlines"], ["x"] * 201, [3]):
        with pytest.raises(ApiError) as info:
            validate_request("image-to-video-multi", {**base, "prompt": bad})
        assert info.value.code == 400 and "prompt" in info.value.message


@pytest.mark.parametrize("seconds,billed", [(0.2, 5), (4.99, 5), (5.0, 5), (5.01, 6), (59.5, 60), (900, 600)])
def test_billing_per_second_with_minimum_and_cap(seconds, billed):
    assert billed_seconds(seconds) == billed


def test_submit_poll_complete_result(env):
    async def flow(client):
        status, reply = await post(client, "/infinitetalk/v1/image-to-video-multi", body(seed=-1))
        assert status == 200 and reply["code"] == 200, reply
        data = reply["data"]
        assert data["status"] == "created" and data["model"] == "infinitetalk/image-to-video-multi"
        assert data["urls"]["get"].endswith(f"/infinitetalk/v1/predictions/{data['id']}/result")
        assert data["created_at"].endswith("Z") and data["billed_seconds"] == 5
        assert env["engine"].counter == 0  # submitting only records the job; a worker runs it
        pid = await dispatch(env, data["id"])
        assert env["service"].get(data["id"]).prompt_id == pid
        r = await (await client.get(f"/infinitetalk/v1/predictions/{data['id']}/status")).json()
        assert r["data"]["status"] == "created"  # claimed and queued, not started
        graph = env["engine"].graphs[pid]
        assert graph["1"]["inputs"]["image"] == "two.png"
        assert graph["2"]["inputs"] == {"left_audio": "left.wav", "right_audio": "right.wav"}
        assert "3" not in graph and "mask" not in graph["4"]["inputs"]  # no mask_image: node and link removed
        assert 0 <= graph["4"]["inputs"]["seed"] <= 2**31 - 1 and graph["4"]["inputs"]["order"] == "left_right"
        assert graph["5"]["inputs"]["filename_prefix"] == f"infinitetalk_api/{data['id']}"
        env["engine"].states[pid] = EngineState("running", [])
        await settle(env)
        r = await (await client.get(f"/infinitetalk/v1/predictions/{data['id']}/status")).json()
        assert r["data"]["status"] == "processing"
        env["engine"].finish(pid, "clip_00001.mp4")
        await settle(env)
        r = await (await client.get(f"/infinitetalk/v1/predictions/{data['id']}/result")).json()
        assert r["data"]["status"] == "completed" and r["data"]["timings"]["inference"] == 1234
        assert r["data"]["outputs"] == [str(client.make_url("/view")) + "?filename=clip_00001.mp4&subfolder=infinitetalk_api&type=output"]
        return data["id"]
    job_id = call(env["service"], flow)
    # Records survive a restart: a new store on the same file still knows the finished job.
    reopened = JobStore(env["store_path"]).get(job_id)
    assert reopened.status == "completed" and reopened.outputs[0]["filename"] == "clip_00001.mp4"


def test_cancel_queued_but_not_running(env):
    async def flow(client):
        _, a = await post(client, "/infinitetalk/v1/image-to-video-multi", body())
        _, b = await post(client, "/infinitetalk/v1/image-to-video-multi", body(seed=7))
        s, r = await post(client, f"/infinitetalk/v1/predictions/{a['data']['id']}/cancel", {})
        assert s == 200 and r["data"]["status"] == "failed" and "cancelled" in r["data"]["error"]
        pid = await dispatch(env, b["data"]["id"])
        env["engine"].states[pid] = EngineState("running", [])
        await settle(env)
        s, r = await post(client, f"/infinitetalk/v1/predictions/{b['data']['id']}/cancel", {})
        assert s == 409 and r["code"] == 409 and "running" in r["message"] and r["data"] is None
        s, r = await post(client, "/infinitetalk/v1/predictions/nope/cancel", {})
        assert s == 404 and r["code"] == 404
    call(env["service"], flow)


def test_refusals_in_contract_shape(env):
    long_wav = write_long_wav(env["inputs"] / "long.wav", 601)
    assert long_wav.exists()

    async def flow(client):
        refusals = {
            "bad scheme": (body(left_audio="file:///etc/passwd"), 400, "scheme"),
            "private address": (body(left_audio="http://10.0.0.8/a.wav"), 400, "private"),
            "over 10 minutes": (body(left_audio="long.wav"), 400, "600"),
            "bad order": (body(order="both"), 400, "order"),
            "bad resolution": (body(resolution="4k"), 400, "resolution"),
            "bad seed": (body(seed="42"), 400, "seed"),
            "missing field": (body(right_audio=None), 400, "right_audio"),
            "path escape": (body(image="../secrets.png"), 400, "input folder"),
            "corrupt audio": (body(right_audio="broken.wav"), 400, "right_audio"),
            "oversize data uri": (body(image="data:image/png;base64," + "A" * (70 * 2**20)), 413, "50 MB"),
        }
        for name, (payload, code, words) in refusals.items():
            status, reply = await post(client, "/infinitetalk/v1/image-to-video-multi", payload)
            assert status == code and reply["code"] == code and reply["data"] is None, (name, reply)
            assert words in reply["message"], (name, reply["message"])
        resp = await client.post("/infinitetalk/v1/image-to-video-multi", data=b"{not json")
        assert resp.status == 400 and "JSON" in (await resp.json())["message"]
    call(env["service"], flow)
    # 1 s + 0.6 s sequential is fine; the 601 s one was refused before any job was queued.
    assert env["engine"].counter == 0


def test_data_uri_input_is_written_into_the_input_folder(env):
    png = (env["inputs"] / "two.png").read_bytes()

    async def flow(client):
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        status, reply = await post(client, "/infinitetalk/v1/image-to-video-multi", body(image=uri))
        assert status == 200, reply
        return reply["data"]["id"], await dispatch(env, reply["data"]["id"])
    job_id, pid = call(env["service"], flow)
    saved = env["inputs"] / "infinitetalk_api" / job_id / "image.png"
    assert saved.read_bytes() == png
    graph = env["engine"].graphs[pid]
    assert graph["1"]["inputs"]["image"] == f"infinitetalk_api/{job_id}/image.png"


def test_bearer_auth(env):
    async def flow(client):
        path = "/infinitetalk/v1/image-to-video-multi"
        s, r = await post(client, path, body())
        assert s == 401 and r["code"] == 401 and "Bearer" in r["message"]
        s, r = await post(client, path, body(), {"Authorization": "Bearer wrong"})
        assert s == 401 and "invalid" in r["message"]
        s, r = await post(client, path, body(), {"Authorization": f"Bearer {KEY}"})
        assert s == 200, r
        resp = await client.get(f"/infinitetalk/v1/predictions/{r['data']['id']}/status")
        assert resp.status == 401
    call(env["service"], flow, keys=(KEY,))


def test_no_keys_means_loopback_only():
    from infinitetalk.service.auth import authorize
    from infinitetalk.service.settings import load_keys

    authorize(None, "127.0.0.1", ())
    authorize(None, "::1", ())
    with pytest.raises(ApiError) as info:
        authorize(None, "192.0.2.10", ())
    assert info.value.code == 401 and "loopback" in info.value.message
    assert load_keys({"INFINITETALK_API_KEYS": " a , b ,"}) == ("a", "b")


def test_twenty_jobs_at_once_none_lost(env):
    async def flow(client):
        replies = await asyncio.gather(*[
            post(client, "/infinitetalk/v1/image-to-video-multi", body(seed=i)) for i in range(20)])
        assert all(s == 200 for s, _ in replies), replies
        ids = [r["data"]["id"] for _, r in replies]
        assert len(set(ids)) == 20
        for i, job_id in enumerate(sorted(ids, key=lambda j: (env["service"].get(j).created_at, j))):
            pid = await dispatch(env, job_id)  # one at a time: the worker claims only when its engine is idle
            if i % 2:
                env["engine"].finish(pid, f"clip_{i}.mp4")
            else:
                env["engine"].states[pid] = EngineState("failed", [], error="boom")
            await settle(env, 1)
        finals = []
        for job_id in ids:
            r = await (await client.get(f"/infinitetalk/v1/predictions/{job_id}/status")).json()
            finals.append(r["data"]["status"])
        return finals
    finals = call(env["service"], flow)
    assert finals.count("completed") == 10 and finals.count("failed") == 10


def test_graph_fill_with_mask_and_unknown_parameter():
    from infinitetalk.service.graph import build_graph

    g = build_graph(TEMPLATE, {"image": "a.png", "mask_image": "m.png", "seed": 3}, filename_prefix="p")
    assert g["3"]["inputs"] == {"image": "m.png", "channel": "alpha"} and g["4"]["inputs"]["mask"] == ["3", 0]
    assert g["4"]["inputs"]["seed"] == 3 and TEMPLATE["4"]["inputs"]["seed"] == 0  # template untouched
    # a hosted output stores no graph (server paths, job ids): the same request makes the same file
    assert g["5"]["inputs"]["embed_workflow"] is False and "embed_workflow" not in TEMPLATE["5"]["inputs"]
    assert "embed_workflow" not in build_graph(TEMPLATE, {"image": "a.png"})["5"]["inputs"]   # no job prefix: as is
    with pytest.raises(ApiError) as info:
        build_graph(TEMPLATE, {"video": "v.mp4"})
    assert info.value.code == 500 and "video" in info.value.message


def test_unknown_model_route_answers_404_in_contract_shape(env):
    async def flow(client):
        s, r = await post(client, "/infinitetalk/v1/text-to-video", body(), {"Authorization": f"Bearer {KEY}"})
        assert s == 404 and r["code"] == 404 and r["data"] is None, r
        assert "text-to-video" in r["message"] and "image-to-video-multi" in r["message"]
        s, r = await post(client, "/infinitetalk/v1/text-to-video", body(), {"Authorization": "Bearer wrong"})
        assert s == 401, r  # auth first: no route list for strangers
    call(env["service"], flow, keys=(KEY,))
    assert env["engine"].counter == 0


def test_bad_input_file_names_its_field_once(env):
    async def flow(client):
        return await post(client, "/infinitetalk/v1/image-to-video-multi", body(right_audio="broken.wav"))
    status, reply = call(env["service"], flow)
    assert status == 400 and reply["message"].startswith("field 'right_audio': ")
    assert reply["message"].count("right_audio") == 1, reply["message"]


def test_job_finished_unobserved_before_a_restart_reports_its_saved_video(env, tmp_path):
    from infinitetalk.service.comfy_engine import find_saved_videos

    out = tmp_path / "output"
    service, engine = env["service"], env["engine"]
    engine.saved_outputs = lambda prefix: find_saved_videos(out, prefix)

    async def flow(client):
        ids = []
        (out / "infinitetalk_api").mkdir(parents=True)
        for seed in (1, 2):
            s, r = await post(client, "/infinitetalk/v1/image-to-video-multi", body(seed=seed))
            assert s == 200, r
            ids.append(r["data"]["id"])
            await dispatch(env, ids[-1])
            if seed == 1:
                (out / "infinitetalk_api" / f"{ids[0]}_00001_.mp4").write_bytes(b"mp4")
            else:
                (out / "infinitetalk_api" / f".{ids[1]}_00001_.partial.mp4").write_bytes(b"half")  # never finished
            engine.states.clear()  # the engine forgot it (its history lives in memory)
            await settle(env, 1)
        return ids, [(await (await client.get(f"/infinitetalk/v1/predictions/{i}/status")).json())["data"] for i in ids]
    ids, (done, lost) = call(service, flow)
    assert done["status"] == "completed" and done["error"] == ""
    assert done["outputs"][0].endswith(f"/view?filename={ids[0]}_00001_.mp4&subfolder=infinitetalk_api&type=output")
    assert lost["status"] == "failed" and "lost" in lost["error"] and lost["outputs"] == []
