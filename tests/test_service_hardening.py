"""Job API hardening, in process on 127.0.0.1: fail-closed auth, malformed requests, envelopes on every
answer, no server paths in messages, disk full, cleanup of refused and old inputs, engine state race."""
from __future__ import annotations

import asyncio
import base64
import errno
import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

from infinitetalk.service import inputs as inputs_module
from infinitetalk.service.auth import access_summary, authorize
from infinitetalk.service.comfy_engine import ComfyEngine
from infinitetalk.service.contract import ApiError, public_message
from infinitetalk.service.jobs import EngineState
from infinitetalk.service.settings import ENV_OPEN, ENV_RETENTION, read_settings
from infinitetalk.service.store import StoreUnavailable
from service_support import KEY, body, call, dispatch, make_env, post, settle, write_png, write_wav

SUBMIT = "/infinitetalk/v1/image-to-video-multi"


@pytest.fixture()
def env(tmp_path):
    return make_env(tmp_path)


def job_folders(env) -> list[str]:
    root = env["inputs"] / "infinitetalk_api"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def data_uri(path, mime) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


# -- auth fails closed --------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [{"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"},
                                    {"X-Real-IP": "203.0.113.9"}])
def test_no_key_refuses_loopback_requests_that_came_through_a_proxy(env, header):
    async def flow(client):
        s, r = await post(client, SUBMIT, body(), header)
        assert s == 401 and r["code"] == 401 and r["data"] is None and "proxy" in r["message"], r
        resp = await client.get("/infinitetalk/v1/predictions/x/status", headers=header)
        assert resp.status == 401
        s, r = await post(client, SUBMIT, body())  # the same loopback client without the header is served
        assert s == 200, r
    call(env["service"], flow)
    assert env["engine"].counter == 1


def test_open_opt_in_admits_proxied_clients_without_a_key(env):
    async def flow(client):
        return await post(client, SUBMIT, body(), {"X-Forwarded-For": "203.0.113.9"})
    status, reply = call(env["service"], flow, is_open=True)
    assert status == 200, reply
    assert read_settings({ENV_OPEN: "1"}).open and not read_settings({}).open and not read_settings({ENV_OPEN: "0"}).open


def test_keys_win_over_the_open_opt_in_and_proxy_headers_do_not_matter_with_a_key():
    with pytest.raises(ApiError):
        authorize(None, "127.0.0.1", (KEY,), is_open=True)
    authorize(f"Bearer {KEY}", "127.0.0.1", (KEY,), proxied=True)
    with pytest.raises(ApiError) as info:
        authorize(None, "203.0.113.9", ())
    assert info.value.code == 401


def test_start_message_says_who_is_let_in():
    assert "loopback" in access_summary((), False) and "X-Forwarded-For" in access_summary((), False)
    assert "ANYONE" in access_summary((), True)
    assert "1 configured" in access_summary((KEY,), True) and KEY not in access_summary((KEY,), True)


@pytest.mark.parametrize("raw", [b"Bearer \xff\xfe", b"Bearer secret-key-12\xff", b"\xff"])
def test_undecodable_authorization_bytes_get_401_not_500(env, raw):
    async def flow(client):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        payload = b'{"image": "two.png"}'
        writer.write(b"POST " + SUBMIT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + raw +
                     b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() +
                     b"\r\nConnection: close\r\n\r\n" + payload)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer
    answer = call(env["service"], flow, keys=(KEY,))
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b'"code": 401' in payload and b"API key" in payload


@pytest.mark.parametrize("broken", ["missing", "folder", "not_utf8"])
def test_an_unreadable_key_file_admits_nobody(env, tmp_path, broken):
    """A key file that cannot be read must not turn the server keyless (loopback admitted): 503 for all."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from infinitetalk.service.settings import ENV_KEYS_FILE, load_keys
    from infinitetalk.service.routes import JobApi

    key_file = tmp_path / "keys.txt"
    if broken == "folder":
        key_file.mkdir()
    elif broken == "not_utf8":
        key_file.write_bytes(b"\xff\xfe" + KEY.encode())
    environ = {ENV_KEYS_FILE: str(key_file), "INFINITETALK_API_KEYS": KEY}
    with pytest.raises(RuntimeError, match=ENV_KEYS_FILE):
        load_keys(environ)

    async def main():
        app = web.Application()
        app.add_routes(JobApi(env["service"], keys=lambda: load_keys(environ), is_open=lambda: True).routes())
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return [await post(client, SUBMIT, body(), headers) for headers in ({}, {"Authorization": f"Bearer {KEY}"})]
    for status, reply in asyncio.run(main()):
        assert status == 503 and reply["code"] == 503 and reply["data"] is None, reply
        assert str(tmp_path) not in reply["message"] and "key" in reply["message"], reply
    assert env["engine"].counter == 0
    if key_file.is_dir():
        key_file.rmdir()
    key_file.write_text(f"# fixed\n{KEY}2\n")
    assert load_keys(environ) == (KEY, f"{KEY}2")
    key_file.write_text("# no key yet\n")   # readable, comments only: no key from the file
    assert load_keys(environ) == (KEY,)


# -- malformed requests and routes --------------------------------------------------------------------------
def test_deeply_nested_json_is_a_400_in_the_envelope(env):
    async def flow(client):
        resp = await client.post(SUBMIT, data=b"[" * 100_000 + b"]" * 100_000,
                                 headers={"Content-Type": "application/json"})
        return resp.status, await resp.json()
    status, reply = call(env["service"], flow)
    assert status == 400 and reply["code"] == 400 and reply["data"] is None and "nested" in reply["message"]


@pytest.mark.parametrize("field,value", [("order", 0), ("order", False), ("order", []), ("resolution", 0),
                                         ("resolution", {"p": 480})])
def test_falsy_non_string_choices_are_refused_not_defaulted(env, field, value):
    async def flow(client):
        return await post(client, SUBMIT, body(**{field: value}))
    status, reply = call(env["service"], flow)
    assert status == 400 and f"field '{field}'" in reply["message"] and repr(value) in reply["message"], reply
    assert env["engine"].counter == 0


def test_null_and_empty_choices_take_the_defaults(env):
    async def flow(client):
        return await post(client, SUBMIT, {**body(), "order": None, "resolution": ""})
    status, reply = call(env["service"], flow)
    assert status == 200, reply
    graph = next(iter(env["engine"].graphs.values()))
    assert graph["4"]["inputs"]["order"] == "left_right" and graph["4"]["inputs"]["resolution"] == "480p"


def test_null_seed_takes_the_default_a_random_seed(env):
    async def flow(client):
        return [await post(client, SUBMIT, {**body(), "seed": None}) for _ in range(2)]
    answers = call(env["service"], flow)
    assert [status for status, _ in answers] == [200, 200], answers
    seeds = [reply["data"]["seed"] for _, reply in answers]
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds) and seeds[0] != seeds[1]


def test_health_not_ready_answers_503_with_retry_after(env, monkeypatch):
    def down(job_id):
        raise StoreUnavailable("connection refused")
    monkeypatch.setattr(env["service"].store, "get", down)

    async def flow(client):
        resp = await client.get("/infinitetalk/v1/health")
        return resp.status, resp.headers.get("Retry-After"), await resp.json()
    status, retry_after, reply = call(env["service"], flow)
    assert status == 503 and reply["message"] == "not ready: the job database is unreachable"
    assert retry_after is not None and int(retry_after) > 0


def test_wrong_method_and_unknown_paths_answer_in_the_envelope(env):
    async def flow(client):
        out = {}
        for method, path in (("GET", SUBMIT), ("PUT", SUBMIT), ("POST", "/infinitetalk/v1/predictions/abc/status"),
                             ("GET", "/infinitetalk/v1/predictions/abc/cancel"), ("GET", "/infinitetalk/v1/nothing/here"),
                             ("DELETE", "/infinitetalk/v1/predictions/abc")):
            resp = await client.request(method, path)
            out[(method, path)] = (resp.status, await resp.json())
        return out
    replies = call(env["service"], flow)
    for (method, path), (status, reply) in replies.items():
        assert set(reply) == {"code", "message", "data"} and reply["code"] == status and reply["data"] is None
        assert path in reply["message"], reply
    assert replies[("GET", SUBMIT)][0] == 405 and "use POST" in replies[("GET", SUBMIT)][1]["message"]
    assert replies[("PUT", SUBMIT)][0] == 405
    assert replies[("POST", "/infinitetalk/v1/predictions/abc/status")][1]["message"].endswith("use GET")
    assert replies[("GET", "/infinitetalk/v1/predictions/abc/cancel")][0] == 405
    assert replies[("GET", "/infinitetalk/v1/nothing/here")][0] == 404
    assert replies[("DELETE", "/infinitetalk/v1/predictions/abc")][0] == 404


def test_catch_all_route_checks_the_key_first(env):
    async def flow(client):
        resp = await client.get(SUBMIT)
        return resp.status, await resp.json()
    status, reply = call(env["service"], flow, keys=(KEY,))
    assert status == 401 and reply["code"] == 401


# -- messages hide the server's folders ---------------------------------------------------------------------
def test_refusals_and_internal_errors_show_no_absolute_server_path(env):
    store = env["service"].store

    def broken_insert(record, **_limits):
        raise OSError(f"cannot open {env['tmp']}/secret/place/db.sqlite")

    async def flow(client):
        refused = await post(client, SUBMIT, body(right_audio="broken.wav"))
        store.insert = broken_insert
        failed = await post(client, SUBMIT, body())
        return refused, failed
    (s1, refused), (s2, failed) = call(env["service"], flow)
    assert s1 == 400 and "right_audio" in refused["message"] and "broken.wav" in refused["message"], refused
    assert s2 == 500 and "db.sqlite" in failed["message"], failed
    for message in (refused["message"], failed["message"]):
        assert str(env["tmp"]) not in message and "/secret/" not in message, message


def test_public_message_rewrites_paths():
    folders = {"input": "/srv/comfy/input"}
    from pathlib import Path

    folders = {k: Path(v) for k, v in folders.items()}
    assert public_message("x: cannot read /srv/comfy/input/a/b.wav", folders) == "x: cannot read <input>/a/b.wav"
    assert public_message("[Errno 2] No such file: '/opt/x/y.json'", folders) == "[Errno 2] No such file: 'y.json'"
    assert public_message("C:\\Users\\me\\a.wav bad", folders) == "a.wav bad"
    kept = "URL http://10.0.0.1/a/b.wav refused; route /infinitetalk/v1/x or /api/infinitetalk/v1/y; ratio 16/9"
    assert public_message(kept, folders) == kept


# -- disk full and cleanup -----------------------------------------------------------------------------------
def test_disk_full_while_saving_an_input_is_507_and_leaves_no_file(env, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            self.f.write(chunk[: len(chunk) // 2])  # part of it lands, then the disk is full
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(self.f.name))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(inputs_module, "open", lambda path, mode: FullDisk(real_open(path, mode)), raising=False)
    write_wav(env["tmp"] / "speech.wav", 0.5)

    async def flow(client):
        return await post(client, SUBMIT, body(left_audio=data_uri(env["tmp"] / "speech.wav", "audio/wav")))
    status, reply = call(env["service"], flow)
    assert status == 507 and reply["code"] == 507 and reply["data"] is None, reply
    assert "field 'left_audio'" in reply["message"] and "no space left" in reply["message"]
    assert "infinitetalk_api/" in reply["message"] and str(env["tmp"]) not in reply["message"]
    assert job_folders(env) == [] and env["engine"].counter == 0


def test_full_job_database_is_507(env, monkeypatch):
    def full(record, **_limits):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(env["service"].store, "insert", full)

    async def flow(client):
        return await post(client, SUBMIT, body(image=data_uri(env["inputs"] / "two.png", "image/png")))
    status, reply = call(env["service"], flow)
    assert status == 507 and "job database" in reply["message"], reply
    assert job_folders(env) == []


def test_a_refused_submission_deletes_what_it_downloaded(env):
    payload = body(image=data_uri(env["inputs"] / "two.png", "image/png"),
                   left_audio=data_uri(env["inputs"] / "left.wav", "audio/wav"),
                   right_audio=data_uri(env["inputs"] / "broken.wav", "audio/wav"))

    async def flow(client):
        return [await post(client, SUBMIT, payload) for _ in range(3)]
    replies = call(env["service"], flow)
    assert all(s == 400 and "right_audio" in r["message"] for s, r in replies), replies
    assert job_folders(env) == []
    assert sorted(p.name for p in env["inputs"].iterdir()) == ["broken.wav", "infinitetalk_api", "left.wav",
                                                                "right.wav", "two.png"]  # uploads untouched


def test_finished_jobs_inputs_are_removed_after_the_retention(tmp_path):
    env = make_env(tmp_path, retention_s=3600.0)
    service, engine = env["service"], env["engine"]
    image = data_uri(env["inputs"] / "two.png", "image/png")

    async def flow(client):
        ids = []
        for seed in (1, 2):
            s, r = await post(client, SUBMIT, body(image=image, seed=seed))
            assert s == 200, r
            ids.append(r["data"]["id"])
        engine.finish(await dispatch(env, ids[0]))
        await settle(env, 1)
        return ids
    done, queued = call(service, flow)
    orphan_old, orphan_new = (env["inputs"] / "infinitetalk_api" / n for n in ("a" * 32, "b" * 32))
    for orphan in (orphan_old, orphan_new):
        orphan.mkdir()
        (orphan / "image.png").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(orphan_old, (two_hours_ago, two_hours_ago))
    now = datetime.now(timezone.utc)
    assert service.clean_inputs(now + timedelta(minutes=59)) == ["a" * 32]  # only the old orphan
    assert service.get(done).status == "completed"
    assert sorted(service.clean_inputs(now + timedelta(minutes=61))) == sorted([done, "b" * 32])
    assert job_folders(env) == [queued]  # a queued job keeps its inputs, whatever its age
    assert service.get(done).status == "completed"  # the record stays


def test_inputs_of_a_recorded_job_no_worker_claimed_yet_are_kept_whatever_their_age(tmp_path):
    """A recorded job is in the queue: some worker will run it (perhaps hours later in a busy fleet), so its
    inputs stay; once it ended they age out from its end."""
    from infinitetalk.service.store import JobRecord

    env = make_env(tmp_path, retention_s=3600.0)
    service = env["service"]
    created = datetime.now(timezone.utc) - timedelta(hours=2)
    job_id = "c" * 32
    service.store.insert(JobRecord(id=job_id, model="infinitetalk-multi", request={}, status="created",
                                   created_at=created.isoformat().replace("+00:00", "Z")))
    folder = env["inputs"] / "infinitetalk_api" / job_id
    folder.mkdir(parents=True)
    (folder / "image.png").write_bytes(b"x")
    assert service.clean_inputs(created + timedelta(minutes=59)) == []
    assert service.clean_inputs(created + timedelta(hours=30)) == [] and job_folders(env) == [job_id]
    ended = created + timedelta(hours=1)
    service.store.update(job_id, status="failed", completed_at=ended.isoformat().replace("+00:00", "Z"))
    assert service.clean_inputs(ended + timedelta(minutes=59)) == []
    assert service.clean_inputs(ended + timedelta(minutes=61)) == [job_id]
    assert job_folders(env) == []


def test_retention_setting_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_RETENTION, "0.5")
    assert read_settings().inputs(tmp_path).retention_s == 1800
    monkeypatch.delenv(ENV_RETENTION)
    assert read_settings().inputs(tmp_path).retention_s == 24 * 3600
    monkeypatch.setenv(ENV_RETENTION, "soon")
    with pytest.raises(RuntimeError, match=ENV_RETENTION):
        read_settings().inputs(tmp_path)


def test_failed_jobs_are_not_billed(env):
    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        assert s == 200 and r["data"]["billed_seconds"] == 5
        env["engine"].states[await dispatch(env, r["data"]["id"])] = EngineState("failed", [], error="boom")
        await settle(env, 1)
        return (await (await client.get(f"/infinitetalk/v1/predictions/{r['data']['id']}/status")).json())["data"]
    data = call(env["service"], flow)
    assert data["status"] == "failed" and data["billed_seconds"] == 0


# -- ComfyEngine.state: a job finishing between the two reads is not lost --------------------------------------
class RacyQueue:
    """ComfyUI's PromptQueue for one prompt that finishes right after the first read of either kind."""

    def __init__(self):
        self.running = [(0, "p1", {}, {}, [])]
        self.history: dict = {}
        self.reads = 0

    def _after_read(self):
        self.reads += 1
        if self.reads == 1:  # the job ends now: ComfyUI moves it from running to history in one step
            self.running = []
            self.history["p1"] = {"status": {"status_str": "success", "completed": True, "messages": []},
                                  "outputs": {"9": {"gifs": [{"filename": "a.mp4", "subfolder": "", "type": "output"}]}}}

    def get_history(self, prompt_id=None):
        out = {k: v for k, v in self.history.items() if k == prompt_id}
        self._after_read()
        return out

    def get_current_queue_volatile(self):
        out = (list(self.running), [])
        self._after_read()
        return out


def test_engine_state_does_not_lose_a_job_finishing_between_reads():
    class Server:
        prompt_queue = RacyQueue()
    state = ComfyEngine(Server()).state("p1")
    assert state.status in ("running", "completed"), state
    assert state.status != "unknown"


def test_disk_full_while_the_worker_records_a_result_is_retried_not_lost(env, monkeypatch):
    """The worker's final write finds the disk full: the job stays its own, and the write is retried
    (the result is recorded once there is space again)."""
    store, worker = env["service"].store, env["worker"]
    real = store.fenced_update

    def full(job_id, worker_id, **changes):
        raise sqlite3.OperationalError("database or disk is full")

    async def flow(client):
        s, r = await post(client, SUBMIT, body())
        assert s == 200, r
        env["engine"].finish(await dispatch(env, r["data"]["id"]))
        monkeypatch.setattr(store, "fenced_update", full)
        with pytest.raises(sqlite3.OperationalError):
            await worker.tick()
        assert env["service"].get(r["data"]["id"]).status == "created"
        monkeypatch.setattr(store, "fenced_update", real)
        await settle(env, 1)
        resp = await client.get(f"/infinitetalk/v1/predictions/{r['data']['id']}/status")
        return resp.status, await resp.json()
    status, reply = call(env["service"], flow)
    assert status == 200 and reply["data"]["status"] == "completed", reply
