"""Finished videos in S3-compatible storage, handed out as presigned GET URLs.

Settings (read by settings.py; without `INFINITETALK_API_S3_BUCKET` outputs stay on ComfyUI's `/view`):
  INFINITETALK_API_S3_BUCKET               bucket name (turns S3 outputs on)
  INFINITETALK_API_S3_INPUTS               1: also stage job inputs there (staging.py; default 0)
  INFINITETALK_API_S3_ENDPOINT_URL         http(s) endpoint of an S3-compatible service (MinIO, R2, ...)
  INFINITETALK_API_S3_REGION               region (default: boto3's own configuration)
  INFINITETALK_API_S3_PREFIX               key prefix, e.g. `infinitetalk/` (default none)
  INFINITETALK_API_S3_URL_EXPIRY_SECONDS   lifetime of each presigned URL, 1 .. 604800 (default 3600)
Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws/credentials, an instance role), never from this package's settings.

A video goes to `s3://<bucket>/<prefix><job id>/<file name>` (multipart above 16 MB, via boto3's
upload_file, which aborts a failed multipart upload so no partial object remains); the job record keeps
the key and URLs are presigned when read, so an expired link is renewed by asking for the result again.
"""
from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outputs import OutputPublishError, output_path, view_url

ENV = "INFINITETALK_API_S3_"
MAX_EXPIRY_S = 7 * 24 * 3600  # SigV4's limit for presigned URLs
MULTIPART_THRESHOLD = 16 * 2**20


@dataclass
class S3Settings:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    prefix: str = ""
    url_expiry_s: int = 3600


def s3_client(settings: S3Settings) -> Any:
    """A boto3 S3 client for the settings (SigV4, bounded timeouts); RuntimeError without boto3 or credentials."""
    try:
        import boto3
    except ImportError:
        raise RuntimeError(f"{ENV}BUCKET is set but boto3 is not installed; pip install boto3") from None
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise RuntimeError(f"{ENV}BUCKET={settings.bucket!r} is set but boto3 finds no credentials; set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role)")
    from botocore.config import Config

    # SigV4 presigning (X-Amz-Expires; the 7-day limit), path-style keys on custom endpoints (MinIO & co.)
    # Bounded waits: an endpoint that is down fails the upload (and the job, with the reason) in seconds.
    config = Config(signature_version="s3v4", s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
                    connect_timeout=10, read_timeout=120, retries={"mode": "standard", "max_attempts": 3})
    return session.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


class S3Outputs:
    """`OutputStore` on S3: `publish` uploads and records keys, `urls` presigns them at read time."""

    def __init__(self, settings: S3Settings, output_dir: Path, client: Any = None):
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.client = client if client is not None else s3_client(settings)

    def key_for(self, job_id: str, filename: str) -> str:
        return f"{self.settings.prefix}{job_id}/{Path(filename).name}"

    def publish(self, job_id: str, engine_outputs: list[dict]) -> list[dict]:
        """Upload each video; raises OutputPublishError (bucket, key, reason) when one cannot be stored."""
        from boto3.s3.transfer import TransferConfig
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        stored = []
        for item in engine_outputs:
            path = output_path(self.output_dir, item)
            key = self.key_for(job_id, item["filename"])
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            try:
                self.client.upload_file(str(path), self.settings.bucket, key, ExtraArgs={"ContentType": ctype},
                                        Config=config)
            except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
                cause = exc.__context__ if isinstance(exc, S3UploadFailedError) and exc.__context__ else exc
                error = getattr(cause, "response", {}).get("Error", {})
                reason = " ".join(filter(None, (error.get("Code"), error.get("Message")))) or type(cause).__name__
                raise OutputPublishError(f"the finished video could not be stored in S3 (bucket "
                                         f"{self.settings.bucket!r}, key {key!r}): {reason}") from exc
            stored.append({"filename": path.name, "type": "s3", "bucket": self.settings.bucket, "key": key})
        return stored

    def urls(self, outputs: list[dict], base_url: str) -> list[str]:
        """Presigned GET URLs (fresh on every read); items not in S3 keep their `/view` URL."""
        out = []
        for item in outputs:
            if item.get("type") == "s3":
                out.append(self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": item["bucket"], "Key": item["key"]},
                    ExpiresIn=self.settings.url_expiry_s))
            else:
                out.append(view_url(item, base_url))
        return out
