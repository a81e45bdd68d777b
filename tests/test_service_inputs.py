"""Fetching job inputs: loopback test server on the allow-list, size caps, redirects, names."""
from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp import web

from infinitetalk.service.contract import ApiError
from infinitetalk.service.inputs import InputSettings, decode_data_uri, resolve_media, safe_input_path

PAYLOAD = b"RIFF" + os.urandom(5000)


async def _with_server(fn):
    async def small(request):
        return web.Response(body=PAYLOAD, content_type="audio/wav")

    async def endless(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"\0" * 65536)
        return resp

    async def slow(request):
        await asyncio.sleep(3)
        return web.Response(body=b"late")

    async def to_private(request):
        raise web.HTTPFound("http://10.0.0.5/secret.wav")

    async def to_small(request):
        raise web.HTTPFound("/small.wav")

    async def missing(request):
        raise web.HTTPNotFound()

    app = web.Application()
    app.add_routes([web.get("/small.wav", small), web.get("/endless", endless), web.get("/slow", slow),
                    web.get("/to-private", to_private), web.get("/to-small", to_small), web.get("/missing", missing)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await fn(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def settings(tmp_path, **kw):
    d = tmp_path / "input"
    d.mkdir(exist_ok=True)
    return InputSettings(input_dir=d, allow_hosts=("127.0.0.1",), **kw)


def run(coro_fn):
    return asyncio.run(_with_server(coro_fn))


def test_fetch_from_allowed_loopback_host(tmp_path):
    s = settings(tmp_path)
    path = run(lambda base: resolve_media("job1", "left_audio", f"{base}/small.wav", s))
    assert path.read_bytes() == PAYLOAD and path.suffix == ".wav"
    assert path.parent == s.input_dir / "infinitetalk_api" / "job1"
    path2 = run(lambda base: resolve_media("job2", "left_audio", f"{base}/to-small", s))
    assert path2.read_bytes() == PAYLOAD


def test_loopback_refused_without_allow_list(tmp_path):
    s = InputSettings(input_dir=tmp_path)
    with pytest.raises(ApiError) as info:
        run(lambda base: resolve_media("j", "left_audio", f"{base}/small.wav", s))
    assert info.value.code == 400 and "loopback" in info.value.message


def test_stream_over_cap_refused_and_nothing_left(tmp_path):
    s = settings(tmp_path, size_caps={"left_audio": 1_000_000})
    with pytest.raises(ApiError) as info:
        run(lambda base: resolve_media("j", "left_audio", f"{base}/endless", s))
    assert info.value.code == 413 and "left_audio" in info.value.message
    assert not any(p.is_file() for p in (s.input_dir / "infinitetalk_api").rglob("*"))


def test_redirect_to_private_address_refused(tmp_path):
    s = settings(tmp_path)
    with pytest.raises(ApiError) as info:
        run(lambda base: resolve_media("j", "right_audio", f"{base}/to-private", s))
    assert "private" in info.value.message and "right_audio" in info.value.message


def test_timeout_and_http_errors(tmp_path):
    s = settings(tmp_path, timeout_s=0.5)
    with pytest.raises(ApiError) as info:
        run(lambda base: resolve_media("j", "image", f"{base}/slow", s))
    assert "timed out" in info.value.message
    with pytest.raises(ApiError) as info:
        run(lambda base: resolve_media("j", "image", f"{base}/missing", s))
    assert "HTTP 404" in info.value.message


def test_data_uris():
    data, ext = decode_data_uri("data:audio/wav;base64,UklGRg==", "left_audio", 100)
    assert data == b"RIFF" and ext == ".wav"
    with pytest.raises(ApiError, match="base64"):
        decode_data_uri("data:audio/wav;base64,@@@", "left_audio", 100)
    with pytest.raises(ApiError) as info:
        decode_data_uri("data:audio/wav;base64," + "A" * 400, "left_audio", 100)
    assert info.value.code == 413
    with pytest.raises(ApiError, match="malformed"):
        decode_data_uri("data:nonsense", "left_audio", 100)


def test_file_names_cannot_escape_the_input_folder(tmp_path):
    root = tmp_path / "input"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.wav").write_bytes(b"x")
    (tmp_path / "secret.wav").write_bytes(b"x")
    os.symlink(tmp_path / "secret.wav", root / "link.wav")
    assert safe_input_path(root, "sub/ok.wav", "left_audio") == (root / "sub" / "ok.wav").resolve()
    assert safe_input_path(root, "sub/ok.wav [input]", "left_audio").name == "ok.wav"
    for bad in ("../secret.wav", "/etc/passwd", "sub/../../secret.wav", "link.wav", "C:\\x.wav", "missing.wav", ""):
        with pytest.raises(ApiError) as info:
            safe_input_path(root, bad, "left_audio")
        assert info.value.code == 400 and "left_audio" in info.value.message
