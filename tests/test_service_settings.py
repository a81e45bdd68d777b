"""A ComfyUI server whose job-API settings are wrong: the error is logged once, every API path (the contract's
and the drop-ins) answers 503 naming the setting, never its value, and nothing is opened; right settings
register the real routes. ComfyUI's `server` / `folder_paths` modules are stood in for here; the real-ComfyUI
tier (tests/comfyui/test_api_misconfigured.py) checks the same against a running ComfyUI."""
from __future__ import annotations

import asyncio
import logging
import sys
import types

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from infinitetalk.service import app, routes
from infinitetalk.service.compat import ROUTES as COMPAT_ROUTES
from infinitetalk.service.store import JobStore

BAD_SETTINGS = [
    ({"INFINITETALK_API_S3_BUCKET": "Not_A_Bucket!"}, "INFINITETALK_API_S3_BUCKET", "Not_A_Bucket!"),
    ({"INFINITETALK_API_WEBHOOK_SECRET": "short-secret"}, "INFINITETALK_API_WEBHOOK_SECRET", "short-secret"),
    ({"INFINITETALK_API_DATABASE_URL": "mysql://root:hunter2@db/jobs"}, "INFINITETALK_API_DATABASE_URL", "hunter2"),
    ({"INFINITETALK_API_DATABASE_URL": "postgresql://app:pass word@db/jobs"}, "INFINITETALK_API_DATABASE_URL",
     "pass word"),
    ({"INFINITETALK_API_LEASE_SECONDS": "soon"}, "INFINITETALK_API_LEASE_SECONDS", "soon"),
    ({"INFINITETALK_API_WORKER": "yes"}, "INFINITETALK_API_WORKER", "yes"),
    ({"INFINITETALK_API_FETCH_TIMEOUT": "-5"}, "INFINITETALK_API_FETCH_TIMEOUT", "-5"),
    ({"INFINITETALK_API_WEBHOOK_STYLE": "svix-ish"}, "INFINITETALK_API_WEBHOOK_STYLE", "svix-ish"),
    ({"INFINITETALK_API_UPLOAD_QUOTA_MB": "lots"}, "INFINITETALK_API_UPLOAD_QUOTA_MB", "lots"),
    ({"INFINITETALK_API_SYNC_WAIT_SECONDS": "4000"}, "INFINITETALK_API_SYNC_WAIT_SECONDS", "4000"),
]
PATHS = [("POST", "/infinitetalk/v1/image-to-video-multi"), ("GET", "/infinitetalk/v1/predictions/abc/status"),
         ("POST", "/infinitetalk/v1/predictions/abc/cancel"), ("PUT", "/infinitetalk/v1/uploads/u1/a.wav"),
         ("POST", "/api/v3/wavespeed-ai/infinitetalk/video-to-video-multi"), ("GET", "/api/v3/predictions/abc/result"),
         ("POST", "/api/v3/media/upload/binary"), ("POST", "/api/v3/media/uploads"),
         ("POST", "/v1/models/community/infinite-talk/fast/multi"), ("GET", "/v1/requests/abc/status"),
         ("GET", "/v1/requests/abc/result"), ("POST", "/v1/requests/abc/cancel"),
         ("POST", "/api/v3/wavespeed-ai/some-other-model")]


class StandInServer:
    """What register_with_comfyui uses of ComfyUI's PromptServer: a route table and the loop."""

    def __init__(self):
        self.routes = web.RouteTableDef()
        self.loop = types.SimpleNamespace(scheduled=[], call_soon_threadsafe=lambda fn: self.loop.scheduled.append(fn))


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    """Stand-in `server` and `folder_paths` modules over folders in tmp_path; the API's env settings cleared."""
    for name in list(__import__("os").environ):
        if name.startswith("INFINITETALK_API"):
            monkeypatch.delenv(name)
    folders = {d: tmp_path / d for d in ("input", "output", "temp", "user")}
    for path in folders.values():
        path.mkdir()
    prompt_server = StandInServer()
    server_module = types.ModuleType("server")
    server_module.PromptServer = types.SimpleNamespace(instance=prompt_server)
    paths = types.ModuleType("folder_paths")
    paths.base_path = str(tmp_path)
    for d, path in folders.items():
        setattr(paths, f"get_{d}_directory", lambda path=path: str(path))
    monkeypatch.setitem(sys.modules, "server", server_module)
    monkeypatch.setitem(sys.modules, "folder_paths", paths)
    return types.SimpleNamespace(server=prompt_server, folders=folders)


def answers(route_table: web.RouteTableDef, requests: list[tuple[str, str]]) -> list[tuple[int, dict]]:
    async def main():
        app = web.Application()
        app.add_routes(route_table)
        out = []
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for method, path in requests:
                resp = await client.request(method, path, json={"image": "two.png"})
                out.append((resp.status, await resp.json()))
        return out
    return asyncio.run(main())


@pytest.mark.parametrize("env,setting,value", BAD_SETTINGS, ids=[s[1] + "=" + s[2] for s in BAD_SETTINGS])
def test_a_bad_setting_is_logged_once_and_every_api_path_answers_503_naming_it(comfyui, monkeypatch, caplog,
                                                                               env, setting, value):
    for name, raw in env.items():
        monkeypatch.setenv(name, raw)
    with caplog.at_level(logging.ERROR, logger="infinitetalk.api"):
        assert app.register_with_comfyui() is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and setting in errors[0] and "not started" in errors[0], errors
    if setting in ("INFINITETALK_API_DATABASE_URL", "INFINITETALK_API_WEBHOOK_SECRET"):
        assert value not in errors[0], errors                          # passwords and secrets stay out of logs
    assert comfyui.server.loop.scheduled == []                       # no worker runs jobs on bad settings
    assert not list(comfyui.folders["user"].rglob("*.sqlite3"))      # and no job database was created
    for (method, path), (status, reply) in zip(PATHS, answers(comfyui.server.routes, PATHS)):
        assert status == 503, (method, path, status, reply)
        message = reply["message"] if "message" in reply else reply["error"]
        assert setting in message and "restart" in message, (path, message)
        assert value not in message, (path, message)                   # a value may be a secret: never echoed
        if path.startswith("/v1/"):
            assert reply == {"error": message, "code": 503}            # RunComfy's error shape
        else:
            assert reply["code"] == 503 and reply["data"] is None      # the contract's envelope


def test_every_drop_in_path_is_refused_on_bad_settings():
    """The refusing table covers each drop-in route (a route added to compat.ROUTES is refused too)."""
    refused = {r.path for r in routes.refusing_routes("x")}
    for _method, path in COMPAT_ROUTES:
        assert path in refused or path.startswith(routes.PREFIX + "/"), path
    assert routes.PREFIX + "/{tail:.*}" in refused


def test_right_settings_register_the_routes_and_a_worker(comfyui, monkeypatch):
    monkeypatch.setenv("INFINITETALK_API", "1")
    assert app.register_with_comfyui() is True
    assert comfyui.server.loop.scheduled[0].__name__ == "ensure_running"   # the upload sweeper, then the worker
    assert len(comfyui.server.loop.scheduled) == 2
    status, reply = answers(comfyui.server.routes, [("GET", "/infinitetalk/v1/predictions/nope/status")])[0]
    assert status == 404 and "nope" in reply["message"], reply       # a real route answered (unknown job)
    assert (comfyui.folders["user"] / "infinitetalk_api" / "jobs.sqlite3").is_file()


def test_an_api_only_server_registers_without_a_worker(comfyui, monkeypatch):
    monkeypatch.setenv("INFINITETALK_API_WORKER", "0")
    assert app.register_with_comfyui() is True
    assert [fn.__name__ for fn in comfyui.server.loop.scheduled] == ["ensure_running"]   # the upload sweeper, no worker


def test_a_malformed_postgres_url_names_the_setting_without_its_password():
    pytest.importorskip("psycopg")
    with pytest.raises(RuntimeError) as info:
        JobStore("postgresql://app:pass word@db.invalid/jobs")
    text = str(info.value)
    assert "INFINITETALK_API_DATABASE_URL=postgresql://app:***@db.invalid/jobs" in text, text
    assert "pass word" not in text, text


def test_a_job_database_that_cannot_be_opened_is_refused_like_a_bad_setting(comfyui, caplog, monkeypatch):
    """A SQLite file that cannot be created (its folder is a file here): 503 on every path, logged once."""
    monkeypatch.setenv("INFINITETALK_API", "1")
    (comfyui.folders["user"] / "infinitetalk_api").write_text("not a folder")
    with caplog.at_level(logging.ERROR, logger="infinitetalk.api"):
        assert app.register_with_comfyui() is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "the job database cannot be opened" in errors[0], errors
    (status, reply), = answers(comfyui.server.routes, [("GET", "/infinitetalk/v1/health")])
    assert status == 503 and "restart" in reply["message"], reply


def test_without_api_settings_only_the_nodes_start(comfyui, caplog):
    """A user who only wants the nodes: one INFO line saying how to turn the API on; no warning, no routes,
    no worker, no job database file."""
    with caplog.at_level(logging.DEBUG, logger="infinitetalk.api"):
        assert app.register_with_comfyui() is False
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(lines) == 1 and lines[0][0] == logging.INFO and "INFINITETALK_API=1" in lines[0][1], lines
    assert comfyui.server.loop.scheduled == [] and len(comfyui.server.routes) == 0
    assert not list(comfyui.folders["user"].rglob("*"))


@pytest.mark.parametrize("env,on", [({"INFINITETALK_API": "1"}, True), ({"INFINITETALK_API_KEYS": "k-1"}, True),
                                    ({"INFINITETALK_API_DATABASE_URL": ""}, False),
                                    ({"INFINITETALK_API": "0", "INFINITETALK_API_KEYS": "k-1"}, False)])
def test_a_key_a_setting_or_the_switch_turns_the_api_on(comfyui, monkeypatch, env, on):
    for name, raw in env.items():
        monkeypatch.setenv(name, raw)
    assert app.register_with_comfyui() is on
    assert (comfyui.folders["user"] / "infinitetalk_api" / "jobs.sqlite3").is_file() is on
    assert len(comfyui.server.loop.scheduled) == (2 if on else 0)   # the upload sweeper and the worker


def test_a_bad_switch_value_is_refused_by_name(comfyui, monkeypatch):
    monkeypatch.setenv("INFINITETALK_API", "yes please")
    assert app.register_with_comfyui() is False
    (status, reply), = answers(comfyui.server.routes, [("GET", "/infinitetalk/v1/health")])
    assert status == 503 and "INFINITETALK_API " in reply["message"] and "yes please" not in reply["message"], reply
