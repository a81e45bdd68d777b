"""Billing follows what was produced: the finished video's measured length (min(600, max(5, ceil(seconds))))
replaces the submit-time estimate, and the 600 s limit at submit is checked on decoded audio, since an MP3
without a Xing/VBRI header is timed by its first frame's bitrate."""
from __future__ import annotations

import io
import math
from fractions import Fraction

import av
import numpy as np
import pytest

from infinitetalk.audio.io import decoded_seconds, probe_audio
from infinitetalk.service.outputs import LocalOutputs, produced_billing
from service_support import body, call, dispatch, make_env, post, settle

SUBMIT = "/infinitetalk/v1/image-to-video-multi"


def mp3_segment(seconds: float, kbps: int, rate: int = 16000) -> bytes:
    """A mono tone as raw MP3 frames at one bitrate, with no Xing/VBRI (or ID3) header."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3", options={"write_xing": "0", "id3v2_version": "0"}) as container:
        stream = container.add_stream("libmp3lame" if "libmp3lame" in av.codecs_available else "mp3", rate=rate)
        stream.layout, stream.bit_rate = "mono", kbps * 1000
        t = np.arange(int(seconds * rate)) / rate
        frame = av.AudioFrame.from_ndarray((np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16)[None],
                                           format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buf.getvalue()


def vbr_mp3(path, loud_s: float, quiet_s: float):
    """`loud_s` at 160 kbps, then `quiet_s` at 8 kbps (1-s segments repeated): a header-less VBR MP3 whose
    length FFmpeg estimates from the first frame's bitrate, far too short."""
    quiet = mp3_segment(1.0, 8)
    path.write_bytes(mp3_segment(loud_s, 160) + quiet * int(quiet_s))
    return path


def write_video(path, frames: int, fps: int = 25):
    """A 32×32 mp4 of `frames` frames at `fps`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i % 255, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_header_less_vbr_mp3_is_timed_by_decoding(tmp_path):
    path = vbr_mp3(tmp_path / "vbr.mp3", 0.2, 12)
    header = probe_audio(path, "left_audio").seconds
    decoded = decoded_seconds(path, "left_audio")
    assert header < 7.0 and decoded > 12.0          # the header's estimate is about half the real length


def test_submit_records_the_decoded_length_and_refuses_over_600_s_hidden_by_the_header(tmp_path):
    env = make_env(tmp_path)
    vbr_mp3(env["inputs"] / "vbr.mp3", 0.2, 12)
    vbr_mp3(env["inputs"] / "long.mp3", 0.2, 601)
    assert probe_audio(env["inputs"] / "long.mp3", "left_audio").seconds < 600

    async def flow(client):
        return [await post(client, SUBMIT, body(left_audio="vbr.mp3")),
                await post(client, SUBMIT, body(right_audio="long.mp3"))]
    (ok, first), (refused, second) = call(env["service"], flow)
    assert ok == 200, first
    rec = env["service"].get(first["data"]["id"])
    with av.open(str(env["inputs"] / "vbr.mp3")) as container:   # counted here independently of the server
        decoded = sum(frame.samples for frame in container.decode(audio=0)) / 16000
    assert rec.video_seconds == pytest.approx(decoded + 0.6) and decoded > 12.0   # left_right: the sum of both
    assert first["data"]["billed_seconds"] == math.ceil(decoded + 0.6)
    assert refused == 400 and second["message"].startswith("field 'right_audio': ") and "600 s" in second["message"]


@pytest.mark.parametrize("frames,fps,billed", [(303, 25, 13), (75, 25, 5), (601, 1, 600)])
def test_a_finished_job_is_billed_for_the_video_it_produced(tmp_path, frames, fps, billed):
    env = make_env(tmp_path)
    out = tmp_path / "output"
    (out / "infinitetalk_api").mkdir(parents=True)
    env["service"].outputs = LocalOutputs(out)
    write_video(out / "infinitetalk_api" / "clip_00001_.mp4", frames, fps)

    async def flow(client):
        _, sub = await post(client, SUBMIT, body())
        env["engine"].finish(await dispatch(env, sub["data"]["id"]), "clip_00001_.mp4")
        await settle(env)
        resp = await client.get(f"/infinitetalk/v1/predictions/{sub['data']['id']}/result")
        return sub["data"], (await resp.json())["data"]
    submitted, result = call(env["service"], flow)
    assert submitted["billed_seconds"] == 5                 # the estimate: 1.6 s of audio
    assert result["status"] == "completed" and result["billed_seconds"] == billed
    assert env["service"].get(result["id"]).video_seconds == pytest.approx(frames / fps)


def test_an_unmeasurable_video_keeps_the_estimate(tmp_path):
    assert produced_billing(LocalOutputs(tmp_path), [{"filename": "gone.mp4", "subfolder": "", "type": "output"}]) == {}
    assert produced_billing(LocalOutputs(), [{"filename": "x.mp4", "subfolder": "", "type": "output"}]) == {}
