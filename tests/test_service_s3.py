"""S3 outputs against a real S3-compatible server (moto's server mode on 127.0.0.1, started and
stopped here): upload, presigned URLs fetched over loopback, the expiry setting, bad settings, and
uploads that fail (no bucket, the endpoint down, credentials refused) failing the job with a clear error."""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
pytest.importorskip("flask")  # moto's server mode (moto[server])

from edge_support import CREDS, MotoServer, aws_env, make_edge_env, moto  # noqa: E402,F401 (fixtures)
from infinitetalk.service.s3 import S3Outputs, S3Settings  # noqa: E402
from infinitetalk.service.settings import read_settings  # noqa: E402
from service_support import body, call, dispatch, post, settle  # noqa: E402


def s3_settings_from_env(env: dict) -> S3Settings | None:
    return read_settings(env).s3


def s3_outputs_from_env(output_dir, env: dict) -> S3Outputs | None:
    """The outputs the app builds from `env` (None: outputs stay on `/view`)."""
    settings = s3_settings_from_env(env)
    return S3Outputs(settings, output_dir) if settings else None


def _bucket(moto, name: str) -> str:
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def _outputs(moto, tmp_path, bucket: str, **kw) -> S3Outputs:
    env = {"INFINITETALK_API_S3_BUCKET": bucket, "INFINITETALK_API_S3_ENDPOINT_URL": moto.url,
           "INFINITETALK_API_S3_REGION": "us-east-1", **kw}
    out = s3_outputs_from_env(tmp_path / "output", env)
    assert out is not None
    return out


def _video(tmp_path, name: str = "clip_00001_.mp4", size: int = 4096) -> dict:
    folder = tmp_path / "output" / "infinitetalk_api"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(os.urandom(size))
    return {"filename": name, "subfolder": "infinitetalk_api", "type": "output"}


def _fetch(url: str) -> tuple[int, bytes]:
    assert urlsplit(url).hostname == "127.0.0.1"  # loopback only
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_upload_and_presigned_url_give_the_same_bytes(moto, tmp_path, aws_env):
    store = _outputs(moto, tmp_path, _bucket(moto, "out-same-bytes"), INFINITETALK_API_S3_PREFIX="renders",
                     INFINITETALK_API_S3_URL_EXPIRY_SECONDS="900")
    item = _video(tmp_path)
    stored = store.publish("job123", [item])
    assert stored == [{"filename": item["filename"], "type": "s3", "bucket": "out-same-bytes",
                       "key": f"renders/job123/{item['filename']}"}]
    head = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").head_object(
        Bucket="out-same-bytes", Key=stored[0]["key"])
    assert head["ContentType"] == "video/mp4"
    [url] = store.urls(stored, "http://unused")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["900"]
    status, data = _fetch(url)
    assert status == 200 and data == (tmp_path / "output" / "infinitetalk_api" / item["filename"]).read_bytes()


def test_large_video_goes_up_in_parts(moto, tmp_path, aws_env):
    store = _outputs(moto, tmp_path, _bucket(moto, "out-multipart"))
    item = _video(tmp_path, "big_00001_.mp4", size=17 * 2**20)   # over the 16 MB multipart threshold
    [stored] = store.publish("jobbig", [item])
    head = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").head_object(
        Bucket="out-multipart", Key=stored["key"])
    assert head["ETag"].strip('"').endswith("-2") and head["ContentLength"] == 17 * 2**20  # a 2-part upload


def test_expiry_setting_is_signed_into_each_url_at_read_time(moto, tmp_path, aws_env):
    """moto serves presigned URLs without enforcing their expiry, so the test checks what S3 enforces:
    the signed X-Amz-Expires, and that every read presigns anew (an old link is renewed by reading again)."""
    for expiry in ("1", "86400"):
        store = _outputs(moto, tmp_path, _bucket(moto, f"out-expiry-{expiry}"),
                         INFINITETALK_API_S3_URL_EXPIRY_SECONDS=expiry)
        stored = store.publish("jobexp", [_video(tmp_path)])
        [first] = store.urls(stored, "http://unused")
        q = parse_qs(urlsplit(first).query)
        assert q["X-Amz-Expires"] == [expiry] and q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    time.sleep(1.1)
    [second] = store.urls(stored, "http://unused")
    assert parse_qs(urlsplit(second).query)["X-Amz-Date"] != q["X-Amz-Date"]
    assert _fetch(second)[0] == 200


@pytest.mark.parametrize("env,setting", [
    ({"INFINITETALK_API_S3_PREFIX": "x/"}, "INFINITETALK_API_S3_BUCKET"),
    ({"INFINITETALK_API_S3_BUCKET": "Bad_Bucket"}, "INFINITETALK_API_S3_BUCKET"),
    ({"INFINITETALK_API_S3_BUCKET": "ok-bucket", "INFINITETALK_API_S3_ENDPOINT_URL": "s3.local:9000"},
     "INFINITETALK_API_S3_ENDPOINT_URL"),
    ({"INFINITETALK_API_S3_BUCKET": "ok-bucket", "INFINITETALK_API_S3_URL_EXPIRY_SECONDS": "0"},
     "INFINITETALK_API_S3_URL_EXPIRY_SECONDS"),
    ({"INFINITETALK_API_S3_BUCKET": "ok-bucket", "INFINITETALK_API_S3_URL_EXPIRY_SECONDS": "a week"},
     "INFINITETALK_API_S3_URL_EXPIRY_SECONDS"),
    ({"INFINITETALK_API_S3_BUCKET": "ok-bucket", "INFINITETALK_API_S3_URL_EXPIRY_SECONDS": "604801"},
     "INFINITETALK_API_S3_URL_EXPIRY_SECONDS"),
])
def test_bad_settings_name_the_setting(env, setting):
    with pytest.raises(RuntimeError) as info:
        s3_settings_from_env(env)
    assert setting in str(info.value) and "expected" in str(info.value)


def test_no_settings_means_no_s3_and_missing_credentials_are_named(tmp_path, monkeypatch):
    assert s3_outputs_from_env(tmp_path, {}) is None
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(RuntimeError) as info:
        s3_outputs_from_env(tmp_path, {"INFINITETALK_API_S3_BUCKET": "ok-bucket"})
    assert "AWS_ACCESS_KEY_ID" in str(info.value)


def test_job_outputs_are_presigned_urls_through_the_api(moto, tmp_path, aws_env):
    out = _outputs(moto, tmp_path, _bucket(moto, "out-api"))
    env = make_edge_env(tmp_path, outputs=out)
    item = _video(tmp_path, "clip_00002_.mp4")

    async def flow(client):
        status, reply = await post(client, "/infinitetalk/v1/image-to-video-multi", body())
        assert status == 200, reply
        job = reply["data"]["id"]
        env["engine"].finish(await dispatch(env, job), item["filename"])
        await settle(env)
        r = await (await client.get(f"/infinitetalk/v1/predictions/{job}/result")).json()
        return job, r["data"]

    job, data = call(env["service"], flow)
    assert data["status"] == "completed", data
    [url] = data["outputs"]
    assert urlsplit(url).path == f"/out-api/{job}/{item['filename']}"
    assert _fetch(url) == (200, (tmp_path / "output" / "infinitetalk_api" / item["filename"]).read_bytes())


def _published_through_a_job(out, tmp_path):
    """Submit, let the worker finish the job on the fake engine with `out` as its outputs; the result read twice."""
    env = make_edge_env(tmp_path, outputs=out)
    item = _video(tmp_path, "clip_00003_.mp4")

    async def flow(client):
        status, reply = await post(client, "/infinitetalk/v1/image-to-video-multi", body())
        job = reply["data"]["id"]
        env["engine"].finish(await dispatch(env, job), item["filename"])
        await settle(env)
        resp = await client.get(f"/infinitetalk/v1/predictions/{job}/result")
        again = await (await client.get(f"/infinitetalk/v1/predictions/{job}/result")).json()
        return resp.status, await resp.json(), again
    return call(env["service"], flow)


def test_upload_failure_fails_the_job_with_a_clear_error(moto, tmp_path, aws_env):
    status, reply, again = _published_through_a_job(_outputs(moto, tmp_path, "no-such-bucket-here"), tmp_path)
    assert status == 200 and reply["data"]["status"] == "failed" and reply["data"]["outputs"] == []
    assert "no-such-bucket-here" in reply["data"]["error"] and "NoSuchBucket" in reply["data"]["error"]
    assert reply["data"]["billed_seconds"] == 0 and again["data"] == reply["data"]


def test_an_endpoint_that_is_down_fails_the_job_in_bounded_time(tmp_path, aws_env):
    from edge_support import free_port

    env = {"INFINITETALK_API_S3_BUCKET": "out-down", "INFINITETALK_API_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    status, reply, _ = _published_through_a_job(s3_outputs_from_env(tmp_path / "output", env), tmp_path)
    assert status == 200 and reply["data"]["status"] == "failed" and reply["data"]["outputs"] == []
    assert "could not be stored in S3" in reply["data"]["error"] and "EndpointConnectionError" in reply["data"]["error"]
    assert time.monotonic() - started < 60                 # retried a few times, not for ever


def test_credentials_the_server_refuses_fail_the_job_with_its_code(tmp_path_factory, tmp_path, aws_env):
    strict = MotoServer(tmp_path_factory.mktemp("moto-auth") / "moto.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:   # this moto checks access keys (it knows none): S3's answer to an unknown key
        out = s3_outputs_from_env(tmp_path / "output", {"INFINITETALK_API_S3_BUCKET": "out-denied",
                                                        "INFINITETALK_API_S3_ENDPOINT_URL": strict.url})
        status, reply, _ = _published_through_a_job(out, tmp_path)
    finally:
        strict.stop()
    assert status == 200 and reply["data"]["status"] == "failed" and reply["data"]["billed_seconds"] == 0
    assert "out-denied" in reply["data"]["error"] and "InvalidAccessKeyId" in reply["data"]["error"]
    assert CREDS["AWS_SECRET_ACCESS_KEY"] not in reply["data"]["error"]


def test_explicit_settings_object(moto, tmp_path, aws_env):
    client = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    store = S3Outputs(S3Settings(bucket=_bucket(moto, "out-explicit")), tmp_path / "output", client=client)
    [stored] = store.publish("j", [_video(tmp_path)])
    assert stored["key"] == "j/clip_00001_.mp4"
    view = {"filename": "a.mp4", "subfolder": "s", "type": "output"}
    assert store.urls([view], "http://127.0.0.1:8188") == ["http://127.0.0.1:8188/view?filename=a.mp4&subfolder=s&type=output"]
