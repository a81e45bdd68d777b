"""Job inputs staged in S3 (moto's server on 127.0.0.1) for a fleet whose servers share no input folder:
the worker elsewhere downloads what it lacks into the job's folder (checked by SHA-256) and its graph names
those copies, a file it holds with the same bytes at the same place is used as it is, a same-named file
with other bytes is never taken for the job's, the submitting server's own worker uses its files, the objects go when the job ends, and a store that fails says so (503 at submit,
a clear job error at the worker)."""
from __future__ import annotations

import base64

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
pytest.importorskip("flask")  # moto's server mode (moto[server])

from edge_support import aws_env, free_port, make_edge_env, moto  # noqa: E402,F401 (fixtures)
from infinitetalk.service.settings import read_settings  # noqa: E402
from infinitetalk.service.staging import S3Inputs  # noqa: E402
from service_support import body, call, dispatch, post, settle, write_png  # noqa: E402

SUBMIT = "/infinitetalk/v1/image-to-video-multi"


def _staging(url: str, bucket: str) -> S3Inputs:
    env = {"INFINITETALK_API_S3_BUCKET": bucket, "INFINITETALK_API_S3_ENDPOINT_URL": url,
           "INFINITETALK_API_S3_INPUTS": "1"}
    settings = read_settings(env)
    assert settings.s3_inputs
    return S3Inputs(settings.s3)


def _bucket(moto, name: str) -> str:
    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=name)
    return name


def _keys(moto, bucket: str) -> list[str]:
    listed = boto3.client("s3", endpoint_url=moto.url).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _two_servers(tmp_path, moto, bucket: str):
    """A (takes submissions) and B (runs jobs) on one job store, each with its own input folder, staging
    in a new bucket."""
    staging = _staging(moto.url, _bucket(moto, bucket))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = make_edge_env(tmp_path / "a", store_path=tmp_path / "jobs.sqlite3", staging=staging)
    b = make_edge_env(tmp_path / "b", store_path=tmp_path / "jobs.sqlite3", staging=staging)
    return a, b


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _graph_inputs(engine, prompt_id: str) -> dict[str, str]:
    graph = engine.graphs[prompt_id]
    return {"image": graph["1"]["inputs"]["image"], "left_audio": graph["2"]["inputs"]["left_audio"],
            "right_audio": graph["2"]["inputs"]["right_audio"]}


def test_a_worker_without_the_input_folder_runs_the_job_from_the_staged_copies(moto, tmp_path, aws_env):
    bucket = "stage-elsewhere"
    a, b = _two_servers(tmp_path, moto, bucket)
    write_png(tmp_path / "pic.png", 80, 48)
    (tmp_path / "b" / "input" / "right.wav").write_bytes(b"RIFF not the same sound")   # B's own right.wav

    async def flow(client):
        s, r = await post(client, SUBMIT, body(image=_data_uri(tmp_path / "pic.png")))
        assert s == 200, r
        job = r["data"]["id"]
        assert len(_keys(moto, bucket)) == 3                     # image, left and right audio
        pid = await dispatch(b, job)                              # B claims it and downloads the inputs
        return job, pid
    job, pid = call(a["service"], flow)
    used = _graph_inputs(b["engine"], pid)
    submitted = a["service"].get(job).request["inputs"]
    assert submitted["image"].startswith(f"infinitetalk_api/{job}/") and submitted["right_audio"] == "right.wav"
    assert used["left_audio"] == "left.wav"                       # B holds the same bytes there: its own file
    for field in ("image", "right_audio"):                        # A's job folder; a right.wav of B's own
        assert used[field].startswith(f"infinitetalk_api/{job}/staged/{field}/"), (field, used[field])
    for field, rel in used.items():
        assert (b["inputs"] / rel).read_bytes() == (a["inputs"] / submitted[field]).read_bytes(), field
    assert not list((b["inputs"] / "infinitetalk_api" / job / "staged").rglob(".*.partial"))
    b["engine"].finish(pid, "clip_00001_.mp4")

    async def finish(client):
        await settle(b)
        return (await (await client.get(f"/infinitetalk/v1/predictions/{job}/status")).json())["data"]
    assert call(a["service"], finish)["status"] == "completed"
    assert _keys(moto, bucket) == []                              # the staged objects went with the job


def test_the_submitting_servers_own_worker_uses_its_files(moto, tmp_path, aws_env):
    bucket = "stage-here"
    a, _ = _two_servers(tmp_path, moto, bucket)

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job = r["data"]["id"]
        return job, await dispatch(a, job)
    job, pid = call(a["service"], flow)
    assert _graph_inputs(a["engine"], pid) == a["service"].get(job).request["inputs"]
    assert not (a["inputs"] / "infinitetalk_api" / job / "staged").exists()   # nothing downloaded


def test_a_store_that_cannot_take_the_inputs_refuses_the_submission(tmp_path, aws_env):
    env = make_edge_env(tmp_path, staging=_staging(f"http://127.0.0.1:{free_port()}", "stage-down"))   # nothing listens

    async def flow(client):
        return await post(client, SUBMIT, body(image=_data_uri(env["inputs"] / "two.png")))
    status, reply = call(env["service"], flow)
    assert status == 503 and "could not be stored in S3" in reply["message"] and "nothing was queued" in reply["message"]
    assert not list((env["inputs"] / "infinitetalk_api").iterdir())   # no files of the refused job
    assert env["engine"].graphs == {}


def test_a_staged_input_gone_from_the_bucket_fails_the_job_clearly(moto, tmp_path, aws_env):
    bucket = "stage-gone"
    a, b = _two_servers(tmp_path, moto, bucket)

    async def flow(client):
        s, r = await post(client, SUBMIT, body(image=_data_uri(a["inputs"] / "two.png")))
        job = r["data"]["id"]
        key = a["service"].get(job).request["staged"]["image"]["key"]
        boto3.client("s3", endpoint_url=moto.url).delete_object(Bucket=bucket, Key=key)
        for _ in range(5):
            await b["worker"].tick()
        return job, (await (await client.get(f"/infinitetalk/v1/predictions/{job}/result")).json())["data"]
    job, data = call(a["service"], flow)
    assert data["status"] == "failed" and b["engine"].graphs == {}
    assert "field 'image'" in data["error"] and "could not be fetched from S3" in data["error"] and "404" in data["error"]
    assert _keys(moto, bucket) == []                              # the rest were removed with the failed job


def test_the_staging_setting_is_checked():
    assert not read_settings({}).s3_inputs and not read_settings({"INFINITETALK_API_S3_INPUTS": "0"}).s3_inputs
    with pytest.raises(RuntimeError, match="INFINITETALK_API_S3_INPUTS='yes'"):
        read_settings({"INFINITETALK_API_S3_INPUTS": "yes", "INFINITETALK_API_S3_BUCKET": "b-1"})
    with pytest.raises(RuntimeError, match="needs INFINITETALK_API_S3_BUCKET"):
        read_settings({"INFINITETALK_API_S3_INPUTS": "1"})


def _serve_two(a, b, flow):
    """`flow(client_a, client_b)` against both servers' APIs on 127.0.0.1 (no keys: loopback is admitted)."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from infinitetalk.service.routes import JobApi

    async def main():
        clients = []
        for env in (a, b):
            app = web.Application(client_max_size=200 * 2**20)
            app.add_routes(JobApi(env["service"], keys=lambda: (), is_open=lambda: False).routes())
            clients.append(TestClient(TestServer(app, host="127.0.0.1")))
            await clients[-1].start_server()
        try:
            return await flow(*clients)
        finally:
            for client in clients:
                await client.close()
    return asyncio.run(main())


def test_uploads_to_one_server_are_taken_by_a_submission_to_another(moto, tmp_path, aws_env):
    """The wavespeed SDK uploads through A (its PUT goes straight to the bucket, presigned) and a multipart
    upload goes to A too; the submission naming them reaches B, which brings them from the bucket."""
    import asyncio

    from aiohttp import FormData

    wavespeed = pytest.importorskip("wavespeed")
    bucket = "stage-uploads"
    a, b = _two_servers(tmp_path, moto, bucket)
    for env in (a, b):
        env["settings"].allow_hosts = ()          # nothing over HTTP: uploads resolve from a folder or the bucket
    client_files = tmp_path / "client"
    client_files.mkdir()
    write_png(client_files / "pair.png", 96, 64)

    async def flow(client_a, client_b):
        base_a = str(client_a.make_url("")).rstrip("/")
        sdk = wavespeed.Client(api_key="unused-on-loopback", base_url=base_a)
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(None, sdk.upload, str(client_files / "pair.png"))
        assert image.startswith(base_a + "/infinitetalk/v1/uploads/")
        form = FormData()
        form.add_field("file", (a["inputs"] / "left.wav").read_bytes(), filename="voice.wav")
        reply = await (await client_a.post("/api/v3/media/upload/binary", data=form)).json()
        left = reply["data"]["download_url"]
        assert not list((b["inputs"]).rglob("pair.png"))       # B has neither file
        fetched = await client_b.get(image[len(base_a):])       # B serves the upload from the bucket
        assert fetched.status == 200 and await fetched.read() == (client_files / "pair.png").read_bytes()
        s, r = await post(client_b, SUBMIT, body(image=image, left_audio=left))
        assert s == 200, r
        return r["data"]["id"]
    job = _serve_two(a, b, flow)
    used = b["service"].get(job).request["inputs"]
    assert (b["inputs"] / used["image"]).read_bytes() == (client_files / "pair.png").read_bytes()
    assert (b["inputs"] / used["left_audio"]).read_bytes() == (a["inputs"] / "left.wav").read_bytes()
    assert any(k.startswith("uploads/") and k.endswith("/pair.png") for k in _keys(moto, bucket))


def test_an_oversized_upload_in_the_bucket_is_refused_at_submit(moto, tmp_path, aws_env):
    from infinitetalk.service import uploads

    bucket = _bucket(moto, "stage-big")
    staging = _staging(moto.url, bucket)
    env = make_edge_env(tmp_path, staging=staging)
    upload_id = "c" * 32
    boto3.client("s3", endpoint_url=moto.url).put_object(Bucket=bucket, Key=staging.upload_key(upload_id, "big.wav"),
                                                         Body=b"\0" * (uploads.CAPS["audio"] + 1))

    async def flow(client):
        url = f"http://127.0.0.1:9/infinitetalk/v1/uploads/{upload_id}/big.wav"
        return await post(client, SUBMIT, body(left_audio=url))
    status, reply = call(env["service"], flow)
    assert status == 413 and "field 'left_audio'" in reply["message"] and "limit" in reply["message"], reply
    assert not list(uploads.uploads_root(env["settings"]).rglob("big.wav"))
