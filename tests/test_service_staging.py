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
from infinitetalk.service.staging import S3Inputs, s3_inputs_from_env  # noqa: E402
from service_support import body, call, dispatch, post, settle, write_png  # noqa: E402

SUBMIT = "/infinitetalk/v1/image-to-video-multi"


def _staging(url: str, bucket: str) -> S3Inputs:
    env = {"INFINITETALK_API_S3_BUCKET": bucket, "INFINITETALK_API_S3_ENDPOINT_URL": url,
           "INFINITETALK_API_S3_INPUTS": "1"}
    staging = s3_inputs_from_env(env)
    assert staging is not None
    return staging


def _bucket(moto, name: str) -> str:
    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=name)
    return name


def _keys(moto, bucket: str) -> list[str]:
    listed = boto3.client("s3", endpoint_url=moto.url).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _two_servers(tmp_path, staging: S3Inputs):
    """A (takes submissions) and B (runs jobs) on one job store, each with its own input folder."""
    a = make_edge_env(tmp_path / "a", store_path=tmp_path / "jobs.sqlite3")
    b = make_edge_env(tmp_path / "b", store_path=tmp_path / "jobs.sqlite3")
    for env in (a, b):
        env["service"].staging = staging
    return a, b


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _graph_inputs(engine, prompt_id: str) -> dict[str, str]:
    graph = engine.graphs[prompt_id]
    return {"image": graph["1"]["inputs"]["image"], "left_audio": graph["2"]["inputs"]["left_audio"],
            "right_audio": graph["2"]["inputs"]["right_audio"]}


def test_a_worker_without_the_input_folder_runs_the_job_from_the_staged_copies(moto, tmp_path, aws_env):
    bucket = _bucket(moto, "stage-elsewhere")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _two_servers(tmp_path, _staging(moto.url, bucket))
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
    bucket = _bucket(moto, "stage-here")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = _two_servers(tmp_path, _staging(moto.url, bucket))

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        job = r["data"]["id"]
        return job, await dispatch(a, job)
    job, pid = call(a["service"], flow)
    assert _graph_inputs(a["engine"], pid) == a["service"].get(job).request["inputs"]
    assert not (a["inputs"] / "infinitetalk_api" / job / "staged").exists()   # nothing downloaded


def test_a_store_that_cannot_take_the_inputs_refuses_the_submission(tmp_path, aws_env):
    env = make_edge_env(tmp_path)
    env["service"].staging = _staging(f"http://127.0.0.1:{free_port()}", "stage-down")   # nothing listens

    async def flow(client):
        return await post(client, SUBMIT, body(image=_data_uri(env["inputs"] / "two.png")))
    status, reply = call(env["service"], flow)
    assert status == 503 and "could not be stored in S3" in reply["message"] and "nothing was queued" in reply["message"]
    assert not list((env["inputs"] / "infinitetalk_api").iterdir())   # no files of the refused job
    assert env["engine"].graphs == {}


def test_a_staged_input_gone_from_the_bucket_fails_the_job_clearly(moto, tmp_path, aws_env):
    bucket = _bucket(moto, "stage-gone")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _two_servers(tmp_path, _staging(moto.url, bucket))

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
    assert s3_inputs_from_env({}) is None and s3_inputs_from_env({"INFINITETALK_API_S3_INPUTS": "0"}) is None
    with pytest.raises(RuntimeError, match="INFINITETALK_API_S3_INPUTS='yes'"):
        s3_inputs_from_env({"INFINITETALK_API_S3_INPUTS": "yes", "INFINITETALK_API_S3_BUCKET": "b-1"})
    with pytest.raises(RuntimeError, match="needs INFINITETALK_API_S3_BUCKET"):
        s3_inputs_from_env({"INFINITETALK_API_S3_INPUTS": "1"})
