"""Every `INFINITETALK_API*` server setting, read and checked once (`read_settings`) when the server starts.

A bad value raises RuntimeError naming the setting (the app then answers 503 naming it, never its value: a
value may be a secret). Only the key file is read again per request, so keys can rotate without a restart.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .inputs import DEFAULT_RETENTION_S, InputSettings
from .s3 import ENV as ENV_S3, MAX_EXPIRY_S, S3Settings
from .store import ENV_DATABASE_URL  # postgresql://… for a fleet; unset = a SQLite file
from .uploads import UploadQuota
from .webhooks import STYLES, WebhookSettings, signing_key

ENV_SWITCH = "INFINITETALK_API"  # 1: serve the job API; 0: never; unset: when any INFINITETALK_API_* is set
ENV_KEYS = "INFINITETALK_API_KEYS"
ENV_KEYS_FILE = "INFINITETALK_API_KEYS_FILE"
ENV_OPEN = "INFINITETALK_API_OPEN"
ENV_ADMIN_KEYS = "INFINITETALK_API_ADMIN_KEYS"
ENV_MAX_QUEUED = "INFINITETALK_API_MAX_QUEUED_PER_ACCOUNT"
ENV_ALLOW_HOSTS = "INFINITETALK_API_ALLOW_HOSTS"
ENV_FETCH_TIMEOUT = "INFINITETALK_API_FETCH_TIMEOUT"
ENV_RETENTION = "INFINITETALK_API_INPUT_RETENTION_HOURS"  # keep a finished job's inputs this long
ENV_WORKFLOWS = "INFINITETALK_API_WORKFLOWS"  # a folder with customised copies of the two API workflows
ENV_WORKER = "INFINITETALK_API_WORKER"  # 0 = an API-only server (runs no jobs)
ENV_LEASE = "INFINITETALK_API_LEASE_SECONDS"
ENV_WEBHOOK_SECRET = "INFINITETALK_API_WEBHOOK_SECRET"
ENV_WEBHOOK_STYLE = "INFINITETALK_API_WEBHOOK_STYLE"    # wavespeed (default) | standard
ENV_PUBLIC_URL = "INFINITETALK_API_PUBLIC_URL"  # base URL of result links in webhook bodies
ENV_SYNC_WAIT = "INFINITETALK_API_SYNC_WAIT_SECONDS"   # how long WaveSpeed's enable_sync_mode holds a request
DEFAULT_SYNC_WAIT_S, MAX_SYNC_WAIT_S = 300.0, 3600.0
ENV_QUOTA_FILES = "INFINITETALK_API_UPLOAD_QUOTA_FILES"   # uploads one account may keep (0: no limit)
ENV_QUOTA_MB = "INFINITETALK_API_UPLOAD_QUOTA_MB"         # megabytes one account may keep (0: no limit)
DEFAULT_LEASE_S = 60.0
DEFAULT_MAX_QUEUED = 100
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
PACKAGE_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "api"


class ApiKey(str):
    """A Bearer key and the account it belongs to: the account named beside it in a key file, else its own
    (`key-` and a digest of the key: the key itself is never stored). An admin key sees every account's jobs."""
    account: str
    admin: bool

    def __new__(cls, key: str, account: str | None = None, admin: bool = False) -> "ApiKey":
        self = super().__new__(cls, key)
        self.account = account or "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        self.admin = admin
        return self


@dataclass(frozen=True)
class KeySource:
    """Where the Bearer keys come from: `INFINITETALK_API_KEYS` (comma-separated, each its own account),
    `INFINITETALK_API_ADMIN_KEYS` (comma-separated; they see every job) and/or the file named by
    `INFINITETALK_API_KEYS_FILE` (one key per line, optionally followed by its account's name, `#` comments),
    re-read on every `load()`."""
    inline: tuple[ApiKey, ...] = ()
    file: Path | None = None

    def load(self) -> tuple[ApiKey, ...]:
        """The configured keys. A key file that is named but cannot be read raises RuntimeError (the routes then
        admit nobody), never silently "no key"; a readable file with only comments means no key yet."""
        if self.file is None:
            return self.inline
        try:
            lines = self.file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RuntimeError(f"{ENV_KEYS_FILE}={self.file}: cannot read the API key file ({exc})") from exc
        keys = []
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) > 2 or (len(words) == 2 and not ACCOUNT_NAME.fullmatch(words[1])):
                raise RuntimeError(f"{ENV_KEYS_FILE}={self.file}: line {number}: expected '<key>' or '<key> <account>' "
                                   "(an account name of 1-64 letters, digits, '.', '_', '@' or '-')")
            keys.append(ApiKey(words[0], words[1] if len(words) == 2 else None))
        return self.inline + tuple(keys)


@dataclass(frozen=True)
class ApiSettings:
    """The job API's settings (see docs/api.md, "Server settings")."""
    keys: KeySource = KeySource()
    open: bool = False
    max_queued: int = DEFAULT_MAX_QUEUED   # per account, jobs created or running; 0 = no limit
    allow_hosts: tuple[str, ...] = ()
    fetch_timeout_s: float = 60.0
    retention_s: float = DEFAULT_RETENTION_S
    workflows_dir: Path = PACKAGE_WORKFLOWS
    database_url: str = ""
    run_worker: bool = True
    lease_s: float = DEFAULT_LEASE_S
    s3: S3Settings | None = None
    s3_inputs: bool = False
    webhooks: WebhookSettings | None = None
    public_url: str = ""
    upload_quota: UploadQuota = UploadQuota()   # per account
    sync_wait_s: float = DEFAULT_SYNC_WAIT_S

    def __post_init__(self) -> None:
        if self.s3_inputs and self.s3 is None:
            raise RuntimeError(f"{ENV_S3}INPUTS=1 needs {ENV_S3}BUCKET: the bucket the job inputs are staged in")

    def inputs(self, input_dir: Path) -> InputSettings:
        """The input-handling settings over ComfyUI's input folder."""
        return InputSettings(input_dir=Path(input_dir), allow_hosts=self.allow_hosts, timeout_s=self.fetch_timeout_s,
                             retention_s=self.retention_s)


def read_settings(environ: Mapping[str, str] | None = None) -> ApiSettings:
    """The settings from the environment; RuntimeError naming the first bad one."""
    env = os.environ if environ is None else environ
    get = lambda name: env.get(name, "").strip()  # noqa: E731
    retention_h = _number(get(ENV_RETENTION), ENV_RETENTION, DEFAULT_RETENTION_S / 3600)
    return ApiSettings(
        keys=KeySource(inline=tuple(ApiKey(k) for k in _list(get(ENV_KEYS)))
                       + tuple(ApiKey(k, admin=True) for k in _list(get(ENV_ADMIN_KEYS))),
                       file=Path(get(ENV_KEYS_FILE)) if get(ENV_KEYS_FILE) else None),
        open=get(ENV_OPEN).lower() in ("1", "true", "yes"),
        max_queued=int(_number(get(ENV_MAX_QUEUED), ENV_MAX_QUEUED, DEFAULT_MAX_QUEUED, whole=True)),
        allow_hosts=_list(get(ENV_ALLOW_HOSTS)),
        fetch_timeout_s=_number(get(ENV_FETCH_TIMEOUT), ENV_FETCH_TIMEOUT, 60.0),
        retention_s=retention_h * 3600,
        workflows_dir=Path(get(ENV_WORKFLOWS) or PACKAGE_WORKFLOWS),
        database_url=get(ENV_DATABASE_URL),
        run_worker=_choice(get(ENV_WORKER), ENV_WORKER, "1 (run jobs here, the default) or 0 (API only)", "1"),
        lease_s=_lease(get(ENV_LEASE)),
        s3=_s3(env),
        s3_inputs=_choice(get(ENV_S3 + "INPUTS"), ENV_S3 + "INPUTS",
                          "1 (stage job inputs in the bucket) or 0 (default)", "0"),
        webhooks=_webhooks(get(ENV_WEBHOOK_SECRET), get(ENV_WEBHOOK_STYLE).lower()),
        public_url=get(ENV_PUBLIC_URL),
        upload_quota=UploadQuota(
            max_files=int(_number(get(ENV_QUOTA_FILES), ENV_QUOTA_FILES, UploadQuota.max_files, whole=True)),
            max_bytes=int(_number(get(ENV_QUOTA_MB), ENV_QUOTA_MB, UploadQuota.max_bytes // 2**20, whole=True)) * 2**20),
        sync_wait_s=_sync_wait(get(ENV_SYNC_WAIT)),
    )


def load_keys(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The keys the environment configures (see KeySource.load)."""
    return read_settings(environ).keys.load()


def api_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """`INFINITETALK_API=1` or `0` decides; unset, the API runs when any other `INFINITETALK_API_*` setting is set
    (a key, a database URL, …), so a ComfyUI that only runs the nodes starts no job queue."""
    env = os.environ if environ is None else environ
    switch = env.get(ENV_SWITCH, "").strip()
    if switch:
        return _choice(switch, ENV_SWITCH, "1 (serve the job API) or 0 (do not)", "0")
    return any(name.startswith(ENV_SWITCH + "_") and value.strip() for name, value in env.items())


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _choice(raw: str, name: str, expected: str, default: str) -> bool:
    """A 0/1 switch; "" is `default`."""
    if raw not in ("", "0", "1"):
        raise RuntimeError(f"{name}={raw!r}: expected {expected}")
    return (raw or default) == "1"


def _number(raw: str, name: str, default: float, whole: bool = False) -> float:
    if not raw:
        return default
    what = "a whole number" if whole else "a number"
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r}: expected {what} (default {default:g})") from None
    if not value >= 0:
        raise RuntimeError(f"{name}={raw!r}: expected {what} >= 0 (default {default:g})")
    return value


def _lease(raw: str) -> float:
    """How long a silent worker keeps its job."""
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 1:
        raise RuntimeError(f"{ENV_LEASE}={raw!r}: expected a number of seconds >= 1 (default {DEFAULT_LEASE_S:.0f})")
    return value


def _sync_wait(raw: str) -> float:
    if not raw:
        return DEFAULT_SYNC_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_SYNC_WAIT_S:
        raise RuntimeError(f"{ENV_SYNC_WAIT}={raw!r}: expected seconds in (0, {MAX_SYNC_WAIT_S:.0f}] "
                           f"(default {DEFAULT_SYNC_WAIT_S:.0f})")
    return value


def _webhooks(secret: str, style: str) -> WebhookSettings | None:
    """The webhook settings, or None when no secret is set (then `?webhook=` is refused at submit). The secret
    must make a key of at least 16 bytes: text after any `whsec_` prefix (WaveSpeed), or base64 (`standard`)."""
    style = style or STYLES[0]
    if style not in STYLES:
        raise RuntimeError(f"{ENV_WEBHOOK_STYLE}={style!r}: expected one of {', '.join(STYLES)} (default {STYLES[0]})")
    if not secret:
        return None
    if style == "standard":
        try:
            key = signing_key(secret, style)
        except ValueError:
            raise RuntimeError(f"{ENV_WEBHOOK_SECRET}: with {ENV_WEBHOOK_STYLE}=standard the secret must be 'whsec_' "
                               "and base64 (as Standard Webhooks libraries generate it)") from None
        if len(key) < 16:
            raise RuntimeError(f"{ENV_WEBHOOK_SECRET}: the secret decodes to {len(key)} bytes; expected at least 16 "
                               f"(24 to 64 random bytes, base64, with {ENV_WEBHOOK_STYLE}=standard)")
    elif (length := len(signing_key(secret))) < 16:
        raise RuntimeError(f"{ENV_WEBHOOK_SECRET}: the secret is {length} characters (after any "
                           "'whsec_' prefix); expected at least 16 random characters")
    return WebhookSettings(secret=secret, style=style)


def _s3(env: Mapping[str, str]) -> S3Settings | None:
    """The bucket settings, None without a bucket (outputs stay on ComfyUI's `/view`)."""
    get = {k: env.get(ENV_S3 + k, "").strip() for k in ("BUCKET", "ENDPOINT_URL", "REGION", "PREFIX",
                                                        "URL_EXPIRY_SECONDS")}
    if not get["BUCKET"]:
        others = [ENV_S3 + k for k, v in get.items() if v]
        if others:
            raise RuntimeError(f"{', '.join(others)} set but {ENV_S3}BUCKET is empty; expected a bucket name to "
                               "store outputs in S3, or none of these settings to keep them on this server")
        return None
    bucket = get["BUCKET"]
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise RuntimeError(f"{ENV_S3}BUCKET={bucket!r}: expected an S3 bucket name (3-63 characters: lower-case "
                           "letters, digits, '.' and '-')")
    endpoint = get["ENDPOINT_URL"] or None
    if endpoint and not re.match(r"^https?://[^/\s]+", endpoint):
        raise RuntimeError(f"{ENV_S3}ENDPOINT_URL={endpoint!r}: expected an http(s) URL such as "
                           "https://s3.example.com")
    expiry = 3600
    if get["URL_EXPIRY_SECONDS"]:
        try:
            expiry = int(get["URL_EXPIRY_SECONDS"])
        except ValueError:
            expiry = -1
        if not 1 <= expiry <= MAX_EXPIRY_S:
            raise RuntimeError(f"{ENV_S3}URL_EXPIRY_SECONDS={get['URL_EXPIRY_SECONDS']!r}: expected a whole number "
                               f"of seconds from 1 to {MAX_EXPIRY_S} (7 days; default 3600)")
    prefix = get["PREFIX"].lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return S3Settings(bucket=bucket, endpoint_url=endpoint, region=get["REGION"] or None, prefix=prefix,
                      url_expiry_s=expiry)
