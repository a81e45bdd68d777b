"""Job inputs staged in S3-compatible storage, for a fleet whose servers share no input folder.

With `INFINITETALK_API_S3_INPUTS=1` (and a bucket, see s3.py) the server that takes a submission uploads
each input it fetched or was given to `s3://<bucket>/<prefix>inputs/<job id>/<field>/<file name>` and keeps
the key, size and SHA-256 with the job. The worker that runs the job uses its own file when it holds the
same bytes at the same place (it took the submission itself, or the folder is shared after all), and
otherwise downloads the object into `<input>/infinitetalk_api/<job id>/staged/<field>/`, checked against
the size and the SHA-256, under a temporary name renamed when complete. The objects are deleted when the
job ends (a bucket lifecycle rule on `<prefix>inputs/` is the backstop for a server that died first).

Files sent to the drop-in upload routes go to `<prefix>uploads/<id>/<name>` as well (the two-step upload's
PUT goes straight there, presigned), so a submission naming one may reach any server: a server that
lacks the upload brings it from the bucket (`fetch_upload`). Expire that prefix with the same rule.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import atomic_write, file_sha256
from .inputs import JOB_INPUTS
from .s3 import S3Settings, s3_client

STAGED = "staged"


class InputStagingError(Exception):
    """An input could not be staged or fetched back; the message names the field and the reason."""


class UploadTooLarge(InputStagingError):
    """An upload in the bucket is larger than the upload routes accept."""


def _reason(exc: BaseException) -> str:
    error = getattr(exc, "response", {}).get("Error", {})
    return " ".join(filter(None, (error.get("Code"), error.get("Message")))) or type(exc).__name__


class S3Inputs:
    """`stage` at submit, `materialize` on the worker, `remove` when the job ends."""

    def __init__(self, settings: S3Settings, client: Any = None):
        self.settings = settings
        self.client = client if client is not None else s3_client(settings)

    def key_for(self, job_id: str, field: str, name: str) -> str:
        return f"{self.settings.prefix}inputs/{job_id}/{field}/{Path(name).name}"

    def stage(self, job_id: str, files: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
        """Upload each field's file; {field: {key, size, sha256}}. InputStagingError (what was uploaded is
        removed again) when one cannot be stored."""
        from botocore.exceptions import BotoCoreError, ClientError
        from boto3.exceptions import S3UploadFailedError

        staged: dict[str, dict[str, Any]] = {}
        try:
            for field, path in files.items():
                key = self.key_for(job_id, field, path.name)
                entry = {"key": key, "size": path.stat().st_size, "sha256": file_sha256(path)}
                self.client.upload_file(str(path), self.settings.bucket, key,
                                        ExtraArgs={"Metadata": {"sha256": entry["sha256"]}})
                staged[field] = entry
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
            self.remove(staged)
            cause = exc.__context__ if isinstance(exc, S3UploadFailedError) and exc.__context__ else exc
            raise InputStagingError(f"field '{field}': the input could not be stored in S3 (bucket "
                                    f"{self.settings.bucket!r}): {_reason(cause)}") from exc
        return staged

    def materialize(self, job_id: str, inputs: Mapping[str, str], staged: Mapping[str, dict[str, Any]],
                    input_dir: Path) -> dict[str, str]:
        """The input-folder-relative names this server's graph uses for the job: its own file where it holds
        the same bytes at the recorded place, else the staged object downloaded into the job's folder."""
        from botocore.exceptions import BotoCoreError, ClientError

        root = Path(input_dir)
        out = dict(inputs)
        for field, entry in staged.items():
            own = root / inputs[field]
            if _same(own, entry):
                continue
            rel = f"{JOB_INPUTS}/{job_id}/{STAGED}/{field}/{Path(entry['key']).name}"
            target = root / rel
            if not _same(target, entry):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with atomic_write(target, target.with_name(f".{target.name}.partial")) as part:
                        self.client.download_file(self.settings.bucket, entry["key"], str(part))
                        if not _same(part, entry):
                            raise InputStagingError(f"field '{field}': the staged input s3://{self.settings.bucket}/"
                                                    f"{entry['key']} does not match what was submitted (size or "
                                                    "SHA-256)")
                except (BotoCoreError, ClientError, OSError) as exc:
                    raise InputStagingError(f"field '{field}': the job's input could not be fetched from S3 "
                                            f"(bucket {self.settings.bucket!r}, key {entry['key']!r}): "
                                            f"{_reason(exc)}") from exc
            out[field] = rel
        return out

    # -- uploads (the drop-in upload routes), so any server can take the submission that names one ----------
    def upload_key(self, upload_id: str, name: str) -> str:
        return f"{self.settings.prefix}uploads/{upload_id}/{name}"

    def put_upload(self, upload_id: str, name: str, path: Path) -> None:
        """Copy a file uploaded to this server into the bucket. InputStagingError."""
        from botocore.exceptions import BotoCoreError, ClientError
        from boto3.exceptions import S3UploadFailedError

        try:
            self.client.upload_file(str(path), self.settings.bucket, self.upload_key(upload_id, name))
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
            cause = exc.__context__ if isinstance(exc, S3UploadFailedError) and exc.__context__ else exc
            raise InputStagingError(f"the upload could not be stored in S3 (bucket {self.settings.bucket!r}): "
                                    f"{_reason(cause)}") from exc

    def upload_url(self, upload_id: str, name: str, content_type: str, expires_s: int) -> str:
        """A presigned PUT of the upload straight into the bucket (the two-step upload's second step)."""
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.settings.bucket, "Key": self.upload_key(upload_id, name),
                                  "ContentType": content_type}, ExpiresIn=expires_s)

    def fetch_upload(self, upload_id: str, name: str, folder: Path, cap: int) -> Path | None:
        """The bucket's copy of an upload, downloaded into `folder` (None when the bucket has none).
        InputStagingError when it is larger than `cap` bytes or cannot be read."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.upload_key(upload_id, name)
        target = Path(folder) / name
        try:
            head = self.client.head_object(Bucket=self.settings.bucket, Key=key)
            if head["ContentLength"] > cap:
                raise UploadTooLarge(f"the uploaded file is {head['ContentLength']} bytes; the limit is {cap}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target, target.with_name(f".{name}.partial")) as part:
                self.client.download_file(self.settings.bucket, key, str(part))
            return target
        except ClientError as exc:
            if str(getattr(exc, "response", {}).get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise InputStagingError(f"the upload could not be read from S3 (bucket {self.settings.bucket!r}): "
                                    f"{_reason(exc)}") from exc
        except (BotoCoreError, OSError) as exc:
            raise InputStagingError(f"the upload could not be read from S3 (bucket {self.settings.bucket!r}): "
                                    f"{_reason(exc)}") from exc

    def remove(self, staged: Mapping[str, dict[str, Any]]) -> None:
        """Delete the staged objects (missing ones are fine)."""
        keys = [{"Key": entry["key"]} for entry in staged.values()]
        if keys:
            self.client.delete_objects(Bucket=self.settings.bucket, Delete={"Objects": keys, "Quiet": True})


def _same(path: Path, entry: Mapping[str, Any]) -> bool:
    try:
        return path.is_file() and path.stat().st_size == entry["size"] and file_sha256(path) == entry["sha256"]
    except OSError:
        return False
