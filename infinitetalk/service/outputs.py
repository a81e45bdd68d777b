"""Where a finished job's videos are published and how clients reach them.

`LocalOutputs` is the one-server behaviour: the video stays in ComfyUI's output folder and is served by
its `/view` route on whichever server the client asked (in a fleet the output folder is shared). Another
`OutputStore` (e.g. object storage) plugs into `JobService(outputs=…)` the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode


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
    """Outputs stay in the output folder: `{filename, subfolder, type}` → `<base>/view?…`."""

    def publish(self, job_id: str, engine_outputs: list[dict]) -> list[dict]:
        return [dict(o) for o in engine_outputs]

    def urls(self, outputs: list[dict[str, Any]], base_url: str) -> list[str]:
        return [view_url(o, base_url) for o in outputs]
