"""The job engine inside ComfyUI: its own prompt queue runs the graphs, its history reports them.

Written against ComfyUI's `server.PromptServer` / `execution.PromptQueue` (checked on 0.33); the
queue item layout `(number, prompt_id, prompt, extra_data, outputs_to_execute[, sensitive])` is the
same one `POST /prompt` uses.
"""
from __future__ import annotations

import inspect
import time
import uuid
from pathlib import Path
from typing import Any

from .contract import ApiError
from .jobs import EngineState

_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")


def _node_error_summary(node_errors: dict) -> str:
    parts = []
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", [])[:2]:
            parts.append(f"node {node_id} ({info.get('class_type', '?')}): {err.get('message', '')} {err.get('details', '')}".strip())
    return "; ".join(parts[:4])


def outputs_of(history_entry: dict) -> list[dict[str, str]]:
    """Video files a finished prompt wrote: [{filename, subfolder, type}]."""
    found = []
    for node_out in (history_entry.get("outputs") or {}).values():
        for items in node_out.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and str(item.get("filename", "")).lower().endswith(_VIDEO_SUFFIXES):
                    found.append({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                  "type": item.get("type", "output")})
    return found


def find_saved_videos(output_dir: Path, prefix: str) -> list[dict[str, str]]:
    """Videos named `<prefix>_<counter>_.<ext>` in `output_dir` (the save node's naming), oldest counter first."""
    sub, _, stem = prefix.rpartition("/")
    folder = output_dir / sub
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.glob(f"{stem}_*") if p.is_file() and p.suffix.lower() in _VIDEO_SUFFIXES)
    return [{"filename": n, "subfolder": sub, "type": "output"} for n in names]


def _inference_ms(messages: list) -> int | None:
    start = end = None
    for event, data in messages or []:
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
    return int(end - start) if start is not None and end is not None else None


def _error_text(messages: list) -> str:
    for event, data in messages or []:
        if event == "execution_error":
            return f"{data.get('node_type', 'node')}: {data.get('exception_message', '').strip()}"
        if event == "execution_interrupted":
            return "the job was interrupted on the server"
    return "the job failed"


class ComfyEngine:
    def __init__(self, server: Any):
        self.server = server

    async def queue(self, graph: dict, job_id: str) -> str:
        import execution  # ComfyUI's module; only importable inside the server

        prompt_id = str(uuid.uuid4())
        valid = execution.validate_prompt(prompt_id, graph, None)
        if inspect.isawaitable(valid):
            valid = await valid
        if not valid[0]:
            message = (valid[1] or {}).get("message", "invalid graph")
            raise ApiError(400, f"the job graph was refused: {message}. {_node_error_summary(valid[3])}".strip())
        number = self.server.number
        self.server.number += 1
        extra = {"create_time": int(time.time() * 1000), "infinitetalk_job": job_id}
        self.server.prompt_queue.put((number, prompt_id, graph, extra, valid[2], {}))
        return prompt_id

    def state(self, prompt_id: str) -> EngineState:
        """Where `prompt_id` is. The queue is read BEFORE the history: ComfyUI moves a finished prompt
        from "running" to the history in one step, so a prompt absent from the queue at the first read
        is in the history at the second; reading them the other way round could miss it in both and
        record a finished job as lost."""
        q = self.server.prompt_queue
        running, queued = q.get_current_queue_volatile()
        hist = q.get_history(prompt_id=prompt_id).get(prompt_id)
        if hist is not None:
            status = hist.get("status") or {}
            messages = status.get("messages") or []
            if status.get("status_str") == "success" and status.get("completed", True):
                return EngineState("completed", outputs_of(hist), inference_ms=_inference_ms(messages))
            return EngineState("failed", [], error=_error_text(messages), inference_ms=_inference_ms(messages))
        if any(item[1] == prompt_id for item in running):
            return EngineState("running", [])
        if any(item[1] == prompt_id for item in queued):
            return EngineState("queued", [])
        return EngineState("unknown", [])

    def saved_outputs(self, prefix: str) -> list[dict[str, str]]:
        """Finished videos under `prefix` in the output folder (the writer renames them into place when done)."""
        import folder_paths  # ComfyUI's module

        return find_saved_videos(Path(folder_paths.get_output_directory()), prefix)

    def cancel(self, prompt_id: str) -> bool:
        return bool(self.server.prompt_queue.delete_queue_item(lambda item: item[1] == prompt_id))

    def busy(self) -> bool:
        """Anything running or queued here (API jobs or a user's own prompts): the worker claims no job then."""
        running, queued = self.server.prompt_queue.get_current_queue_volatile()
        return bool(running or queued)

    def interrupt(self, prompt_id: str) -> None:
        """Stop `prompt_id` if it is the one running (a worker that lost the job's lease to another)."""
        running, _ = self.server.prompt_queue.get_current_queue_volatile()
        if any(item[1] == prompt_id for item in running):
            import comfy.model_management  # ComfyUI's module (what its Interrupt button calls)

            comfy.model_management.interrupt_current_processing()
