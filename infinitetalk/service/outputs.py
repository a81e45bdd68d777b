"""Where a finished job's videos are published and how clients reach them.

`LocalOutputs` is the one-server behaviour: the video stays in ComfyUI's output folder and is served by
its `/view` route on whichever server the client asked (in a fleet the output folder is shared). Another
`OutputStore` (e.g. object storage) plugs into `JobService(outputs=…)` the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from ..errors import InputError
from .contract import billed_seconds

log = logging.getLogger("infinitetalk.api")


class OutputPublishError(Exception):
    """Publishing a finished job's video failed; the message is shown to the client as the job's error."""


def view_url(item: dict, base_url: str) -> str:
    """ComfyUI's `/view` URL of an output item."""
    query = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                       "type": item.get("type", "output")})
    return f"{base_url.rstrip('/')}/view?{query}"


def output_path(output_dir: Path, item: dict) -> Path:
    """The file of an output item, refusing names that leave the output folder."""
    root = Path(output_dir).resolve()
    target = (root / item.get("subfolder", "") / item["filename"]).resolve()
    if root not in target.parents:
        raise OutputPublishError(f"output {item.get('filename')!r} is not inside the output folder")
    return target


class OutputStore(Protocol):
    def publish(self, job_id: str, engine_outputs: list[dict]) -> list[dict]:
        """Called by the worker when a job completes; returns what is kept in JobRecord.outputs."""
        ...

    def urls(self, outputs: list[dict], base_url: str) -> list[str]:
        """The client-facing URLs of a record's outputs (`base_url`: the origin the client used)."""
        ...


class LocalOutputs:
    """Outputs stay in the output folder: `{filename, subfolder, type}` → `<base>/view?…`. `output_dir` (the
    folder the engine writes to) lets the finished video be measured for billing (`produced_billing`)."""

    def __init__(self, output_dir: Path | None = None):
        self.output_dir = None if output_dir is None else Path(output_dir)

    def publish(self, job_id: str, engine_outputs: list[dict]) -> list[dict]:
        return [dict(o) for o in engine_outputs]

    def urls(self, outputs: list[dict[str, Any]], base_url: str) -> list[str]:
        return [view_url(o, base_url) for o in outputs]


def produced_billing(store: Any, engine_outputs: list[dict]) -> dict[str, Any]:
    """`video_seconds` and `billed_seconds` of the finished video, measured from its file: what was produced is
    billed, not the estimate made at submit. {} (the estimate stands) when the store knows no output folder
    or the file cannot be read (logged)."""
    from ..video.reader import probe_video

    output_dir = getattr(store, "output_dir", None)
    videos = [item for item in engine_outputs if item.get("type", "output") == "output"]
    if output_dir is None or not videos:
        return {}
    try:
        seconds = probe_video(output_path(output_dir, videos[0]), "output").seconds
    except (InputError, OutputPublishError, OSError) as exc:
        log.warning("the finished video %r could not be measured for billing: %s", videos[0].get("filename"), exc)
        return {}
    if not seconds > 0:   # NaN: the file does not say
        return {}
    return {"video_seconds": seconds, "billed_seconds": billed_seconds(seconds)}
