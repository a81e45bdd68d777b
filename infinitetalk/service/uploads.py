"""Files uploaded through the WaveSpeed-style upload routes, kept under `<input>/infinitetalk_api/uploads/`.

Each upload gets a random 128-bit id: `<input>/infinitetalk_api/uploads/<id>/<name>`. Its
`download_url` is `<server>/infinitetalk/v1/uploads/<id>/<name>`; a submission naming such a URL is
served from that folder without any HTTP request (`local_upload`), whatever host the URL names, since
the id is the capability. Files are written under a temporary name and renamed when complete, capped
like inputs (images and audio 50 MB, video 100 MB), and removed after the input retention time.

Expired uploads are removed, and what each owner (the uploading caller's account) stores is tallied, by an
`UploadSweeper` on a timer in a worker thread that app.py starts with the server, never on the event loop and
never per request; a new upload is refused with 429 (and `Retry-After`) while its owner is over `UploadQuota`
(`check`). Uploads are attributed to the account named in each upload folder's `.owner` file.

The two-step upload (`POST /api/v3/media/uploads`, then `PUT` to the returned URL, as the wavespeed
SDK does) authorises the PUT by a one-time ticket token in its URL, like an S3 presigned PUT: the SDK
sends no Authorization header there. The ticket lives beside the file, so any server sharing the input
folder can take the PUT.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..files import atomic_write
from .contract import SIZE_CAPS, ApiError
from .inputs import JOB_INPUTS, InputSettings, disk_full_as_507

UPLOADS = "uploads"
URL_PATH = "/infinitetalk/v1/uploads"
TICKET_TTL_S = 3600.0
_TYPES = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp"),
    "video": (".mp4", ".mov", ".webm", ".mkv", ".avi"),
    "audio": (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus"),
}
CAPS = {"image": SIZE_CAPS["image"], "video": SIZE_CAPS["video"], "audio": SIZE_CAPS["left_audio"]}
_LOCAL = re.compile(r"(?:/api)?" + re.escape(URL_PATH) + r"/([0-9a-f]{32})/([^/]+)")
_TICKET = ".ticket.json"
_OWNER = ".owner"
_STAGED = ".staged"   # a ticket whose PUT goes to the bucket: its announced size, held here for the quota
SWEEP_EVERY_S = 60.0
log = logging.getLogger("infinitetalk.api")


def uploads_root(settings: InputSettings) -> Path:
    return Path(settings.input_dir) / JOB_INPUTS / UPLOADS


def media_type(name: str) -> str:
    """image / video / audio from the file name's extension; ApiError 400 for anything else."""
    suffix = Path(name).suffix.lower()
    for kind, suffixes in _TYPES.items():
        if suffix in suffixes:
            return kind
    known = ", ".join(s for group in _TYPES.values() for s in group)
    raise ApiError(400, f"field 'file': file name {name!r} has extension {suffix or '(none)'!r}; expected one of {known}")


def safe_name(name: str | None) -> str:
    """A plain file name from a client's name: its last path part, other characters replaced by '_'."""
    base = re.split(r"[\\/]", (name or "").strip())[-1]
    stem, suffix = os.path.splitext(base)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip("._")[:80] or "upload"
    clean = stem + suffix.lower()
    media_type(clean)
    return clean


def download_url(base_url: str, upload_id: str, name: str) -> str:
    return f"{base_url.rstrip('/')}{URL_PATH}/{upload_id}/{name}"


def _folder(settings: InputSettings, upload_id: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
        raise ApiError(404, f"no upload with id {upload_id!r}")
    return uploads_root(settings) / upload_id


def _mark_owner(folder: Path, owner: str) -> None:
    if owner:
        (folder / _OWNER).write_text(owner)


async def save(settings: InputSettings, name: str, chunks: AsyncIterator[bytes], upload_id: str | None = None,
               expected_size: int | None = None, owner: str = "") -> tuple[str, Path, int]:
    """Stream `chunks` to a new upload (or the ticketed `upload_id`) of `owner`; returns (id, path, size)."""
    kind = media_type(name)
    cap = CAPS[kind]
    upload_id = upload_id or uuid.uuid4().hex
    folder = _folder(settings, upload_id)
    with disk_full_as_507(f"the input folder's {JOB_INPUTS}/{UPLOADS}/", "file"):
        folder.mkdir(parents=True, exist_ok=True)
        _mark_owner(folder, owner)
    final = folder / name
    size = 0
    try:
        with disk_full_as_507(f"the input folder's {JOB_INPUTS}/{UPLOADS}/", "file"), \
                atomic_write(final, folder / f".{name}.partial") as tmp:
            with open(tmp, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > cap or (expected_size is not None and size > expected_size):
                        limit = f"the {cap / 2**20:.0f} MB limit for {kind}" if size > cap else \
                            f"the {expected_size} bytes announced for this upload"
                        raise ApiError(413, f"field 'file': the upload is larger than {limit}")
                    f.write(chunk)
            if size == 0:
                raise ApiError(400, "field 'file': the uploaded file is empty")
            if expected_size is not None and size != expected_size:
                raise ApiError(400, f"field 'file': {size} bytes arrived; the upload ticket announced {expected_size}")
    finally:
        if not final.exists() and expected_size is None:
            shutil.rmtree(folder, ignore_errors=True)
    return upload_id, final, size


def ticket_terms(filename: object, size: object) -> tuple[str, int]:
    """The clean name and checked size of an announced upload; ApiError 400/413 naming the field."""
    name = safe_name(filename if isinstance(filename, str) else None)
    cap = CAPS[media_type(name)]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= cap:
        raise ApiError(400 if not isinstance(size, int) or size <= 0 else 413,
                       f"field 'size' must be the file's size in bytes, 1 .. {cap} for {media_type(name)}; got {size!r}")
    return name, size


def create_ticket(settings: InputSettings, filename: str, size: object, owner: str = "") -> tuple[str, str, str]:
    """A one-time PUT ticket of `owner` for `filename` of `size` bytes: (upload id, clean name, token)."""
    name, size = ticket_terms(filename, size)
    upload_id, token = uuid.uuid4().hex, secrets.token_urlsafe(24)
    folder = _folder(settings, upload_id)
    with disk_full_as_507(f"the input folder's {JOB_INPUTS}/{UPLOADS}/", "file"):
        folder.mkdir(parents=True, exist_ok=True)
        _mark_owner(folder, owner)
        (folder / _TICKET).write_text(json.dumps({
            "name": name, "size": size, "expires": time.time() + TICKET_TTL_S,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest()}))
    return upload_id, name, token


def hold_staged_ticket(settings: InputSettings, upload_id: str, name: str, size: int, owner: str = "") -> None:
    """Count a presigned bucket PUT against `owner` like a local ticket (the sweep recounts from this folder;
    it expires with the other uploads)."""
    folder = _folder(settings, upload_id)
    with disk_full_as_507(f"the input folder's {JOB_INPUTS}/{UPLOADS}/", "file"):
        folder.mkdir(parents=True, exist_ok=True)
        _mark_owner(folder, owner)
        (folder / _STAGED).write_text(json.dumps({"name": name, "size": size}))


def take_ticket(settings: InputSettings, upload_id: str, name: str, token: str) -> int:
    """Check and consume the ticket of a PUT; returns the announced size. 403/404/410 otherwise."""
    path = _folder(settings, upload_id) / _TICKET
    try:
        ticket = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ApiError(404, f"no open upload ticket {upload_id!r} (already used, expired or never issued)") from None
    digest = hashlib.sha256((token or "").encode()).hexdigest()
    if not hmac.compare_digest(digest, ticket.get("token_sha256", "")) or name != ticket.get("name"):
        raise ApiError(403, "the upload URL's token or file name does not match its ticket")
    try:
        path.unlink()  # one use: a second PUT with the same URL finds no ticket
    except FileNotFoundError:
        raise ApiError(404, f"no open upload ticket {upload_id!r} (already used)") from None
    if ticket.get("expires", 0) < time.time():
        raise ApiError(410, f"the upload ticket {upload_id!r} expired; ask for a new one")
    return int(ticket["size"])


def stored_file(settings: InputSettings, upload_id: str, name: str) -> Path:
    """The completed upload `<id>/<name>`; ApiError 404 when there is none."""
    folder = _folder(settings, upload_id)
    path = folder / name
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        raise ApiError(404, f"no uploaded file {upload_id}/{name} on this server (expired or never uploaded)")
    return path


def local_upload(settings: InputSettings, value: str, field_name: str,
                 remote: Callable[[str, str], Path | None] | None = None) -> Path | None:
    """The local file a `download_url` of this server's upload routes names, or None when `value` is another
    URL. `remote(upload_id, name)` brings an upload this server lacks from where the fleet keeps them (a
    bucket) and returns its local path, or None when there is none either."""
    try:
        path = urlsplit(value).path
    except ValueError:
        return None
    m = _LOCAL.fullmatch(path)
    if not m:
        return None
    upload_id, name = m.group(1), unquote(m.group(2))
    try:
        return stored_file(settings, upload_id, name)
    except ApiError as exc:
        fetched = remote(upload_id, name) if remote is not None and exc.code == 404 and _clean(name) else None
        if fetched is not None:
            return fetched
        raise ApiError(400, f"field '{field_name}': {exc.message}") from None


def _clean(name: str) -> bool:
    """Whether `name` is one the upload routes could have stored (what safe_name leaves unchanged)."""
    try:
        return safe_name(name) == name
    except ApiError:
        return False


@dataclass(frozen=True)
class UploadQuota:
    """What one owner may keep in uploads at a time (0: no limit); settings.py reads it."""

    max_files: int = 2000
    max_bytes: int = 10 * 2**30


@dataclass
class Usage:
    """What one owner stores: uploads, bytes, and when the oldest was written (it expires first)."""

    files: int = 0
    bytes: int = 0
    oldest: float | None = None


class UploadSweeper:
    """Removes expired uploads and tallies each owner's `Usage`, every `interval_s` in a worker thread (`run`),
    so neither uploads piling up nor the sweep itself slows the event loop. `check` refuses an owner over
    `quota` with 429; `added` counts an upload at once (the next sweep recounts from the disk, which also
    brings in uploads other servers sharing the folder took)."""

    def __init__(self, settings: InputSettings, quota: UploadQuota | None = None, interval_s: float = SWEEP_EVERY_S):
        self.settings = settings
        self.quota = quota or UploadQuota()
        self.interval_s = interval_s
        self.usage: dict[str, Usage] = {}
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    def sweep(self, now: float | None = None) -> list[str]:
        """One pass (blocking: call it off the loop): remove expired folders, recount the rest; removed ids."""
        now = time.time() if now is None else now
        usage: dict[str, Usage] = {}
        removed = []
        root = uploads_root(self.settings)
        for folder in (root.iterdir() if root.is_dir() else ()):
            try:
                written = folder.stat().st_mtime
                if not folder.is_dir():
                    continue
                if now - written >= self.settings.retention_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
                    continue
                owner = (folder / _OWNER).read_text() if (folder / _OWNER).is_file() else ""
                size = sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("."))
                for held in (folder / _TICKET, folder / _STAGED):   # an open ticket holds its announced size
                    if held.is_file():
                        size = max(size, int(json.loads(held.read_text()).get("size", 0)))
            except (OSError, ValueError):   # removed meanwhile (a job's folder, another server's sweep)
                continue
            u = usage.setdefault(owner, Usage())
            u.files, u.bytes = u.files + 1, u.bytes + size
            u.oldest = written if u.oldest is None else min(u.oldest, written)
        self.usage = usage
        return removed

    def added(self, owner: str, size: int, now: float | None = None) -> None:
        u = self.usage.setdefault(owner, Usage())
        u.files, u.bytes = u.files + 1, u.bytes + size
        if u.oldest is None:
            u.oldest = time.time() if now is None else now

    def check(self, owner: str, adding_bytes: int = 0, now: float | None = None) -> None:
        """ApiError 429 (Retry-After: until the owner's oldest upload expires) when one more upload of
        `adding_bytes` would put `owner` over the quota."""
        u = self.usage.get(owner, Usage())
        q = self.quota
        over = (q.max_files and u.files + 1 > q.max_files) or (q.max_bytes and u.bytes + adding_bytes > q.max_bytes)
        if not over:
            return
        now = time.time() if now is None else now
        wait = int(max(1, (u.oldest or now) + self.settings.retention_s - now)) if u.files else int(self.interval_s)
        limits = " and ".join(filter(None, (q.max_files and f"{q.max_files} uploads",
                                             q.max_bytes and f"{q.max_bytes // 2**20} MB")))
        raise ApiError(429, f"upload quota reached: {u.files} uploads, {u.bytes / 2**20:.0f} MB stored (at most "
                            f"{limits} per account); uploads expire {self.settings.retention_s / 3600:g} h after "
                            "they were made", retry_after_s=wait)

    async def run(self) -> None:
        """Sweep now and every `interval_s` until `stop()`; trouble is logged, never raised."""
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                removed = await loop.run_in_executor(None, self.sweep)
                if removed:
                    log.info("job API: removed %d expired uploads", len(removed))
            except Exception:  # noqa: BLE001 - the sweep must outlive one bad pass
                log.exception("sweeping uploads failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    def ensure_running(self) -> None:
        """Start `run` on the running loop unless it runs already (app.py, when the server starts)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        self._stopping.set()
