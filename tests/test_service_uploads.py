"""Uploads are swept on a timer in a worker thread (never per request, never on the event loop), and each
account (all its keys together) may keep at most its quota: more is a 429 with Retry-After."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from aiohttp import FormData

from edge_support import make_edge_env
from infinitetalk.service import uploads
from infinitetalk.service.inputs import InputSettings
from infinitetalk.service.settings import ENV_QUOTA_FILES, ENV_QUOTA_MB, ApiKey, read_settings
from service_support import KEY
from test_service_compat import serve

OTHER_KEY = "other-key-456"


def _form(name: str, data: bytes) -> FormData:
    form = FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    return form


def _old_and_new_uploads(settings: InputSettings, old: int, new: int, owner: str = "acct-a") -> None:
    root = uploads.uploads_root(settings)
    past = time.time() - settings.retention_s - 60
    for i in range(old + new):
        folder = root / f"{i:032x}"
        folder.mkdir(parents=True)
        (folder / "a.wav").write_bytes(b"x" * 1000)
        (folder / ".owner").write_text(owner)
        if i < old:
            os.utime(folder, (past, past))


def test_the_sweep_runs_on_its_timer_in_a_worker_thread_not_per_request(tmp_path):
    env = make_edge_env(tmp_path)
    service = env["service"]
    settings = service.settings
    _old_and_new_uploads(settings, old=30, new=5)
    sweeper = service.upload_sweeper
    sweeper.interval_s = 3600.0
    threads = []
    real = sweeper.sweep

    def spy(now=None):
        threads.append(threading.current_thread())
        return real(now)
    sweeper.sweep = spy

    async def flow(client):
        auth = {"Authorization": f"Bearer {KEY}"}
        for i in range(6):
            resp = await client.post("/api/v3/media/upload/binary", data=_form(f"l{i}.wav", b"RIFF" * 10), headers=auth)
            assert resp.status == 200, await resp.text()
        assert threads == []                        # requests never sweep: the server starts the sweeper (app.py)
        sweeper.ensure_running()
        for i in range(6, 12):
            resp = await client.post("/api/v3/media/upload/binary", data=_form(f"l{i}.wav", b"RIFF" * 10), headers=auth)
            assert resp.status == 200, await resp.text()
        await asyncio.sleep(0.2)
        sweeper.stop()
    serve(service, flow)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()   # once (the timer), off the loop
    left = sorted(p.name for p in uploads.uploads_root(settings).iterdir())
    assert len(left) == 5 + 12 and f"{0:032x}" not in left                  # the expired ones are gone
    assert sweeper.usage["acct-a"].files == 5


def test_quota_is_per_owner_and_answers_429_with_retry_after(tmp_path):
    env = make_edge_env(tmp_path)
    service = env["service"]
    service.upload_sweeper.quota = uploads.UploadQuota(max_files=2, max_bytes=10_000)

    async def flow(client):
        mine = {"Authorization": f"Bearer {KEY}"}
        theirs = {"Authorization": f"Bearer {OTHER_KEY}"}
        out = []
        for headers in (mine, mine, mine, theirs):
            resp = await client.post("/api/v3/media/upload/binary", data=_form("a.wav", b"RIFF" * 10), headers=headers)
            out.append((resp.status, resp.headers.get("Retry-After"), await resp.json()))
        big = await client.post("/api/v3/media/uploads", json={"filename": "b.wav", "size": 20_000}, headers=theirs)
        out.append((big.status, big.headers.get("Retry-After"), await big.json()))
        service.upload_sweeper.stop()
        return out
    out = serve(service, flow, keys=(KEY, OTHER_KEY))
    assert [status for status, _, _ in out] == [200, 200, 429, 200, 429]
    _, retry_after, refused = out[2]
    assert refused["code"] == 429 and "upload quota reached: 2 uploads" in refused["message"]
    assert 0 < int(retry_after) <= service.settings.retention_s             # until the oldest upload expires
    assert "upload quota reached: 1 uploads" in out[4][2]["message"] and int(out[4][1]) > 0   # announced bytes count
    owners = {(p / ".owner").read_text() for p in uploads.uploads_root(service.settings).iterdir()}
    assert len(owners) == 2 and all(KEY not in o and OTHER_KEY not in o for o in owners)   # keys never stored


def test_keys_of_one_account_share_its_upload_quota(tmp_path):
    service = make_edge_env(tmp_path)["service"]
    service.upload_sweeper.quota = uploads.UploadQuota(max_files=2, max_bytes=0)

    async def flow(client):
        out = []
        for key in (KEY, OTHER_KEY, KEY):
            resp = await client.post("/api/v3/media/upload/binary", data=_form("a.wav", b"RIFF" * 10),
                                     headers={"Authorization": f"Bearer {key}"})
            out.append((resp.status, await resp.json()))
        return out
    out = serve(service, flow, keys=(ApiKey(KEY, "acme"), ApiKey(OTHER_KEY, "acme"), ApiKey("third-key-789")))
    assert [status for status, _ in out] == [200, 200, 429], out
    assert "upload quota reached: 2 uploads" in out[2][1]["message"]
    owners = {(p / ".owner").read_text() for p in uploads.uploads_root(service.settings).iterdir()}
    assert owners == {"acme"}


def test_quota_settings():
    assert read_settings({}).upload_quota == uploads.UploadQuota()
    assert read_settings({ENV_QUOTA_FILES: "0", ENV_QUOTA_MB: "5"}).upload_quota == \
        uploads.UploadQuota(max_files=0, max_bytes=5 * 2**20)
    for bad in ({ENV_QUOTA_FILES: "-1"}, {ENV_QUOTA_MB: "1.5"}):
        with pytest.raises(RuntimeError, match="INFINITETALK_API_UPLOAD_QUOTA_"):
            read_settings(bad)


def test_a_ticket_put_straight_to_the_bucket_counts_against_its_account(tmp_path):
    """Staged inputs: the PUT goes to the bucket, not this server; its announced size is still held here, so a
    sweep does not forget it (else an account could upload without limit through presigned tickets)."""
    settings = InputSettings(input_dir=tmp_path, allow_hosts=("127.0.0.1",))
    sweeper = uploads.UploadSweeper(settings, uploads.UploadQuota(max_files=1, max_bytes=10_000))
    uploads.hold_staged_ticket(settings, "a" * 32, "v.mp4", 6_000, owner="acct")
    sweeper.sweep()
    assert (sweeper.usage["acct"].files, sweeper.usage["acct"].bytes) == (1, 6_000)
    with pytest.raises(uploads.ApiError) as refused:
        sweeper.check("acct", 100)
    assert refused.value.code == 429
    with pytest.raises(uploads.ApiError) as missing:   # the file itself is in the bucket: fetched when named
        uploads.stored_file(settings, "a" * 32, "v.mp4")
    assert missing.value.code == 404
