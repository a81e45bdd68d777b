"""Where a finished job's videos are published and how clients reach them.

`LocalOutputs` is the one-server behaviour: the video stays in ComfyUI's output folder and is served by
its `/view` route on whichever server the client asked (in a fleet the output folder is shared). Another
`OutputStore` (e.g. object storage) plugs into `JobService(outputs=…)` the same way.
"""
from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlencode


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
        base = base_url.rstrip("/")
        return [f"{base}/view?{urlencode({'filename': o['filename'], 'subfolder': o.get('subfolder', ''), 'type': o.get('type', 'output')})}"
                for o in outputs]
