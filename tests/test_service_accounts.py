"""Accounts: each key's jobs are its account's alone (404 to any other, as for an unknown id; an admin key sees
all), key files naming accounts, the per-account queue limit (429 + Retry-After) and idempotent submits."""
from __future__ import annotations

import asyncio
import base64

import pytest

from infinitetalk.service.auth import CALLER, Caller
from infinitetalk.service.inputs import InputSettings
from infinitetalk.service.settings import ApiKey, KeySource, read_settings
from infinitetalk.service.store import JobStore
from service_support import TEMPLATE, FakeEngine, body, call, post, with_worker, write_png, write_wav

SUBMIT = "/infinitetalk/v1/image-to-video-multi"
A, B, ADMIN = "key-of-a-123", "key-of-b-456", "key-of-admin-789"
KEYS = (ApiKey(A), ApiKey(B), ApiKey(ADMIN, admin=True))
WORKFLOWS = {"image-to-video-multi": TEMPLATE, "video-to-video-multi": TEMPLATE}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def server(tmp_path, target=None, **service_kw):
    """A service (and its worker) over an input folder with the test media and a job store at `target`."""
    inputs = tmp_path / "input"
    inputs.mkdir(exist_ok=True)
    write_wav(inputs / "left.wav", 1.0)
    write_wav(inputs / "right.wav", 0.6, freq=330)
    write_png(inputs / "two.png")
    service, _worker = with_worker(JobStore(target or tmp_path / "jobs.sqlite3"), FakeEngine(),
                                   InputSettings(input_dir=inputs), WORKFLOWS, {"lease_s": 30.0}, cancel_wait_s=0.0,
                                   **service_kw)
    return service


def test_a_job_is_seen_only_by_its_account_and_an_admin(tmp_path):
    service = server(tmp_path)

    async def flow(client):
        s, r = await post(client, SUBMIT, body(), bearer(A))
        assert s == 200, r
        job_id = r["data"]["id"]
        seen = {}
        for who, key in (("a", A), ("b", B), ("admin", ADMIN)):
            for path in (f"/infinitetalk/v1/predictions/{job_id}/status", f"/api/v3/predictions/{job_id}/result"):
                resp = await client.get(path, headers=bearer(key))
                seen[who, path.split("/")[1]] = resp.status, (await resp.json())
        unknown = await client.get("/infinitetalk/v1/predictions/nope/status", headers=bearer(B))
        cancel_b = await post(client, f"/infinitetalk/v1/predictions/{job_id}/cancel", {}, bearer(B))
        return job_id, seen, (unknown.status, await unknown.json()), cancel_b
    job_id, seen, unknown, cancel_b = call(service, flow, keys=KEYS, local_worker=False)
    assert seen["a", "infinitetalk"][0] == 200 and seen["a", "infinitetalk"][1]["data"]["id"] == job_id
    assert seen["admin", "infinitetalk"][0] == 200 and seen["admin", "api"][0] == 200
    for other in (seen["b", "infinitetalk"], seen["b", "api"], cancel_b):
        assert other[0] == 404 and other[1]["message"] == f"no prediction with id '{job_id}'", other
    assert unknown[0] == 404 and unknown[1]["message"] == "no prediction with id 'nope'"   # the same answer
    assert service.get(job_id).status == "created"                    # B's cancel changed nothing


def test_keys_in_a_file_may_share_one_account(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# team keys\n{A} team-1\n{B}   team-1\n{ADMIN}\n")
    keys = KeySource(file=key_file).load()
    assert [(k, k.account) for k in keys[:2]] == [(A, "team-1"), (B, "team-1")]
    assert keys[2].account.startswith("key-") and ADMIN not in keys[2].account   # its own account; never the key
    service = server(tmp_path)

    async def flow(client):
        s, r = await post(client, SUBMIT, body(), bearer(A))
        resp = await client.get(f"/infinitetalk/v1/predictions/{r['data']['id']}/status", headers=bearer(B))
        other = await client.get(f"/infinitetalk/v1/predictions/{r['data']['id']}/status", headers=bearer(ADMIN))
        return resp.status, other.status
    assert call(service, flow, keys=keys, local_worker=False) == (200, 404)   # same team; another account
    key_file.write_text(f"{A} team 1\n")
    with pytest.raises(RuntimeError, match="line 1: expected '<key>' or '<key> <account>'"):
        KeySource(file=key_file).load()


def data_image(tmp_path) -> str:
    """The test picture as a data: URI (each submission then keeps its own copy in its job folder)."""
    return "data:image/png;base64," + base64.b64encode((tmp_path / "input" / "two.png").read_bytes()).decode()


def job_folders(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "input" / "infinitetalk_api").iterdir() if p.is_dir())


def test_an_accounts_queue_limit_answers_429_with_retry_after(tmp_path):
    service = server(tmp_path, max_queued=2)
    image = data_image(tmp_path)

    async def flow(client):
        replies = []
        for key in (A, A, A, B):
            resp = await client.post(SUBMIT, json=body(image=image), headers=bearer(key))
            replies.append((resp.status, resp.headers.get("Retry-After"), await resp.json()))
        first = replies[0][2]["data"]["id"]
        service.store.update(first, status="completed")                 # one of A's jobs ended
        again = await post(client, SUBMIT, body(image=image), bearer(A))
        return replies, again
    replies, again = call(service, flow, keys=KEYS, local_worker=False)
    assert [r[0] for r in replies] == [200, 200, 429, 200]               # B has its own queue
    status, retry_after, reply = replies[2]
    assert retry_after is not None and int(retry_after) > 0 and "2 jobs queued or running" in reply["message"]
    assert again[0] == 200
    accepted = [r[2]["data"]["id"] for r in replies if r[0] == 200] + [again[1]["data"]["id"]]
    assert job_folders(tmp_path) == sorted(accepted)                     # the refused one left no files


def test_a_repeated_idempotency_key_returns_the_first_job(tmp_path):
    service = server(tmp_path)

    async def flow(client):
        first = await post(client, SUBMIT, body(), {**bearer(A), "Idempotency-Key": "order-17"})
        again = await post(client, SUBMIT, body(prompt="changed"), {**bearer(A), "Idempotency-Key": "order-17"})
        field = await post(client, SUBMIT, body(dedupe_key="order-17"), bearer(A))
        other = await post(client, SUBMIT, body(), {**bearer(B), "Idempotency-Key": "order-17"})   # another account
        bad = await post(client, SUBMIT, body(dedupe_key=["x"]), bearer(A))
        return first, again, field, other, bad
    first, again, field, other, bad = call(service, flow, keys=KEYS, local_worker=False)
    job_id = first[1]["data"]["id"]
    assert first[0] == again[0] == field[0] == other[0] == 200
    assert again[1]["data"]["id"] == field[1]["data"]["id"] == job_id and other[1]["data"]["id"] != job_id
    assert service.store.get(job_id).request["prompt"] == "two friends chat"   # the first job, as it was
    assert bad[0] == 400 and "dedupe_key" in bad[1]["message"]

    service.store.update(job_id, created_at="2020-01-01T00:00:00.000Z")       # the key is older than 24 h
    async def later(client):
        return await post(client, SUBMIT, body(), {**bearer(A), "Idempotency-Key": "order-17"})
    status, reply = call(service, later, keys=KEYS, local_worker=False)
    assert status == 200 and reply["data"]["id"] != job_id


def test_twin_submissions_with_one_key_make_one_job(tmp_path):
    """Two retries in flight at once (each fetching its inputs): the store keeps one job, the other answer is it."""
    service = server(tmp_path)
    image = data_image(tmp_path)

    async def main():
        CALLER.set(Caller(account="acct-1", admin=False, idempotency_key="twin"))
        return await asyncio.gather(*(service.submit("image-to-video-multi", body(image=image)) for _ in range(4)))
    records = asyncio.run(main())
    assert len({r.id for r in records}) == 1
    assert job_folders(tmp_path) == [records[0].id]                        # the twins' inputs were removed


def test_account_settings_are_checked():
    settings = read_settings({"INFINITETALK_API_KEYS": "k1,k2", "INFINITETALK_API_ADMIN_KEYS": "root-key",
                              "INFINITETALK_API_MAX_QUEUED_PER_ACCOUNT": "5"})
    keys = settings.keys.load()
    assert keys == ("k1", "k2", "root-key") and [k.admin for k in keys] == [False, False, True]
    assert len({k.account for k in keys}) == 3 and settings.max_queued == 5
    assert read_settings({}).max_queued == 100
    with pytest.raises(RuntimeError, match="INFINITETALK_API_MAX_QUEUED_PER_ACCOUNT"):
        read_settings({"INFINITETALK_API_MAX_QUEUED_PER_ACCOUNT": "lots"})
