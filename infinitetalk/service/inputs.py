"""Turn a submitted media field (https URL, `data:` URI, or an uploaded file name) into a local file.

A URL that is a `download_url` of this server's upload routes (`uploads.py`) is taken from the upload
folder without an HTTP request; every other URL goes through the guard.

Fetched and decoded files land in `<input>/infinitetalk_api/<job id>/`, written under a temporary
name and renamed when complete, so a refused or broken download leaves nothing a graph could read.
A refused submission removes its whole folder (`remove_job_inputs`); finished jobs' folders are removed
after `InputSettings.retention_s` (`JobService.clean_inputs`). A full disk is answered with 507.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import os
import re
import shutil
import socket
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from ..files import atomic_write
from .contract import SIZE_CAPS, ApiError
from .guard import Resolver, check_url, system_resolver

_EXT_BY_TYPE = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/bmp": ".bmp",
    "video/mp4": ".mp4", "video/quicktime": ".mov", "video/webm": ".webm", "video/x-matroska": ".mkv",
    "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/mpeg": ".mp3", "audio/mp3": ".mp3",
    "audio/flac": ".flac", "audio/ogg": ".ogg", "audio/mp4": ".m4a", "audio/aac": ".aac", "audio/x-m4a": ".m4a",
}
_KNOWN_EXT = set(_EXT_BY_TYPE.values()) | {".jpeg", ".opus", ".avi"}
JOB_INPUTS = "infinitetalk_api"  # subfolder of the input folder holding one folder per job
DEFAULT_RETENTION_S = 24 * 3600.0
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass
class InputSettings:
    input_dir: Path
    allow_hosts: tuple[str, ...] = ()
    timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    max_redirects: int = 3
    size_caps: dict[str, int] = field(default_factory=lambda: dict(SIZE_CAPS))
    resolver: Resolver = system_resolver
    retention_s: float = DEFAULT_RETENTION_S  # how long a finished job's input files are kept
    sweep_interval_s: float = 600.0  # the retention sweep runs at most this often (on submit)


@contextlib.contextmanager
def disk_full_as_507(place: str, field_name: str | None = None) -> Iterator[None]:
    """Turn "no space left" (OSError ENOSPC/EDQUOT/EFBIG, SQLite "disk is full") into ApiError(507)
    naming `place` (a folder described without its absolute path)."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as exc:
        full = exc.errno in _DISK_FULL if isinstance(exc, OSError) else "full" in str(exc).lower()
        if not full:
            raise
        who = f"field '{field_name}': " if field_name else ""
        raise ApiError(507, f"{who}no space left on the server's disk for {place}; nothing was kept, "
                            "try again later") from exc


def remove_job_inputs(settings: InputSettings, job_id: str) -> None:
    """Delete everything fetched for `job_id` (its folder under `<input>/infinitetalk_api/`)."""
    if re.fullmatch(r"[0-9a-f]{32}", job_id):
        shutil.rmtree(Path(settings.input_dir) / JOB_INPUTS / job_id, ignore_errors=True)


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def safe_input_path(input_dir: Path, name: str, field_name: str) -> Path:
    """An existing file inside `input_dir` named by `name`; refuses anything that escapes it."""
    name = name.strip()
    if name.endswith(" [input]"):
        name = name[: -len(" [input]")]
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or "\x00" in name or pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name):
        raise ApiError(400, f"field '{field_name}': file name {name!r} must be a plain name inside the input folder")
    root = Path(input_dir).resolve()
    target = (root / Path(*pure.parts)).resolve()
    if target != root and root not in target.parents:
        raise ApiError(400, f"field '{field_name}': file name {name!r} resolves outside the input folder")
    if not target.is_file():
        raise ApiError(400, f"field '{field_name}': no uploaded file named {name!r} in the input folder")
    return target


def _job_folder(settings: InputSettings, job_id: str) -> Path:
    folder = Path(settings.input_dir) / JOB_INPUTS / job_id
    with disk_full_as_507(f"the input folder's {JOB_INPUTS}/"):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_atomic(folder: Path, stem: str, ext: str, chunks) -> Path:
    """Write `chunks` to `<folder>/<stem><ext>` via a temporary name; the temporary file never stays."""
    final = folder / f"{stem}{ext}"
    with disk_full_as_507(f"the input folder's {JOB_INPUTS}/", stem), \
            atomic_write(final, folder / f".{stem}{ext}.partial") as tmp:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
    return final


def decode_data_uri(value: str, field_name: str, cap: int) -> tuple[bytes, str]:
    """(payload, extension) of a `data:` URI, refusing payloads over `cap` bytes."""
    m = _DATA_URI.match(value)
    if not m:
        raise ApiError(400, f"field '{field_name}': malformed data: URI (expected data:<type>;base64,<data>)")
    payload = value[m.end():]
    estimate = len(payload) * 3 // 4 if m.group("b64") else len(payload)
    if estimate > cap:
        raise ApiError(413, f"field '{field_name}': data is larger than the {_mb(cap)} limit")
    try:
        data = base64.b64decode(payload, validate=True) if m.group("b64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"field '{field_name}': data: URI payload is not valid base64 ({exc})") from exc
    if len(data) > cap:
        raise ApiError(413, f"field '{field_name}': data is larger than the {_mb(cap)} limit")
    if not data:
        raise ApiError(400, f"field '{field_name}': data: URI is empty")
    return data, _EXT_BY_TYPE.get((m.group("type") or "").lower(), ".bin")


def _ext_for(url: str, content_type: str | None) -> str:
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    if suffix in _KNOWN_EXT:
        return suffix
    return _EXT_BY_TYPE.get((content_type or "").split(";")[0].strip().lower(), ".bin")


def _pinned_resolver(host: str, addresses: list[str]):
    """An aiohttp resolver that only ever returns the addresses the guard approved."""
    from aiohttp.abc import AbstractResolver

    class Pinned(AbstractResolver):
        async def resolve(self, name, port=0, family=socket.AF_INET):
            if name != host:
                raise OSError(f"unexpected host {name}")
            return [{"hostname": name, "host": a, "port": port,
                     "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                     "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addresses]

        async def close(self):
            return None

    return Pinned()


async def fetch_url(url: str, field_name: str, settings: InputSettings, folder: Path) -> Path:
    """Download `url` into `folder` with the guard checked at every redirect hop."""
    import aiohttp

    cap = settings.size_caps.get(field_name, 50 * 2**20)
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=settings.timeout_s, connect=settings.connect_timeout_s)
    for _hop in range(settings.max_redirects + 1):
        decision = await loop.run_in_executor(None, check_url, url, settings.allow_hosts, settings.resolver)
        if not decision.allowed:
            raise ApiError(400, f"field '{field_name}': URL refused: {decision.reason}")
        connector = aiohttp.TCPConnector(resolver=_pinned_resolver(decision.host, decision.addresses),
                                         use_dns_cache=False, force_close=True)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    if resp.status != 200:
                        raise ApiError(400, f"field '{field_name}': fetching the URL failed with HTTP {resp.status}")
                    if resp.content_length is not None and resp.content_length > cap:
                        raise ApiError(413, f"field '{field_name}': file is larger than the {_mb(cap)} limit")
                    chunks, size = [], 0
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > cap:
                            raise ApiError(413, f"field '{field_name}': file is larger than the {_mb(cap)} limit")
                        chunks.append(chunk)
                    if size == 0:
                        raise ApiError(400, f"field '{field_name}': the URL returned an empty file")
                    return _write_atomic(folder, field_name, _ext_for(url, resp.headers.get("Content-Type")), chunks)
        except asyncio.TimeoutError as exc:
            raise ApiError(400, f"field '{field_name}': fetching the URL timed out after {settings.timeout_s:.0f} s") from exc
        except aiohttp.ClientError as exc:
            raise ApiError(400, f"field '{field_name}': fetching the URL failed ({type(exc).__name__}: {exc})") from exc
    raise ApiError(400, f"field '{field_name}': too many redirects (more than {settings.max_redirects})")


def _link_into(source: Path, folder: Path, field_name: str) -> Path:
    """The job's own copy of an uploaded file (a hard link where possible), so sweeping uploads never
    takes a queued job's input away."""
    target = folder / f"{field_name}{source.suffix.lower()}"
    with disk_full_as_507(f"the input folder's {JOB_INPUTS}/", field_name), \
            atomic_write(target, folder / f".{target.name}.partial") as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return target


async def resolve_media(job_id: str, field_name: str, value: str, settings: InputSettings,
                        local_upload: Callable[[InputSettings, str, str], Path | None] | None = None) -> Path:
    """Local file for one media field (see module docstring). `local_upload(settings, url, field)` names the
    file behind a `download_url` of this server's upload routes (None for any other URL)."""
    if value.startswith("data:"):
        cap = settings.size_caps.get(field_name, 50 * 2**20)
        data, ext = decode_data_uri(value, field_name, cap)
        return _write_atomic(_job_folder(settings, job_id), field_name, ext, [data])
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ApiError(400, f"field '{field_name}': URL refused: scheme '{scheme}' is not allowed; use https (or http)")
        uploaded = None if local_upload is None else \
            await asyncio.get_running_loop().run_in_executor(None, local_upload, settings, value, field_name)  # may download
        if uploaded is not None:
            return _link_into(uploaded, _job_folder(settings, job_id), field_name)
        return await fetch_url(value, field_name, settings, _job_folder(settings, job_id))
    return safe_input_path(settings.input_dir, value, field_name)
