"""Parity kinds for the pure loop pieces: timesteps, chunk_plan, audio_windows, color_match."""
from __future__ import annotations

from ..runner import Case, Outputs


def run(case: Case) -> Outputs:
    call = case.call
    if case.component == "timesteps":
        from ...pipeline.schedule import timesteps

        ts = timesteps(int(call["steps"]), float(call["shift"]), int(call.get("num_timesteps", 1000)))
        return Outputs(tensors={"timesteps": ts})
    if case.component == "chunk_plan":
        from ...pipeline.windows import plan_chunks

        max_frames = call.get("max_frames")
        plan = plan_chunks(int(call["audio_frames"]), int(call.get("frame_num", 81)),
                           int(call.get("motion_frames", 9)), None if max_frames is None else int(max_frames))
        return Outputs(json=plan.to_json())
    if case.component == "audio_windows":
        from ...pipeline.windows import gather_audio_window

        emb = case.inputs()["embeddings"]
        win, m = gather_audio_window(emb, int(call["start"]), int(call.get("frame_num", 81)),
                                     int(call.get("window", 5)))
        return Outputs(tensors={"window": win}, json={"mirror_pad_rows": m})
    if case.component == "color_match":
        from ...pipeline.color import match_and_blend_colors

        inp = case.inputs()
        out = match_and_blend_colors(inp["video"], inp["reference"], float(call["strength"]))
        return Outputs(tensors={"video": out})
    raise ValueError(f"loop kinds do not handle component {case.component!r}")
