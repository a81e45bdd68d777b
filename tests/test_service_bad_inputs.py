"""Bad-input suite for the job API (in process, 127.0.0.1): each class of hostile or over-limit media is
refused at submit time, quickly, within a memory bound, naming the field and the limit, queueing
nothing and leaving no file behind. Files are generated here (a 16000×16000 PNG is a 0.8 MB bomb)."""
from __future__ import annotations

import base64
import time

import pytest

from infinitetalk import limits
from service_support import (PeakMemory, body, call, encoded_audio, make_env, png_bomb, post, write_flat_png,
                             write_wav)

SUBMIT = "/infinitetalk/v1/{kind}"
MAX_SECONDS_TO_REFUSE = 5.0
MAX_EXTRA_MEMORY = 1 << 30


def _uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """name -> (mime, bytes) of every generated bad input."""
    folder = tmp_path_factory.mktemp("bad_media")

    def wav(name, seconds, rate=16000, channels=1):
        return ("audio/wav", write_wav(folder / name, seconds, rate=rate, channels=channels).read_bytes())

    def png(name, w, h, rgba):
        return ("image/png", write_flat_png(folder / name, w, h, rgba).read_bytes())

    bomb = png_bomb(16000, 16000)
    return {
        "png_bomb": ("image/png", bomb),
        "flac_384k": ("audio/flac", encoded_audio(384_000, 0.5)),
        "wav_30ms": wav("short.wav", 0.03),
        "wav_2khz": wav("low.wav", 0.5, rate=2000),
        "wav_33ch": wav("many.wav", 0.2, channels=33),
        "wav_8ch": wav("eight.wav", 0.5, channels=8),
        "wav_192k": wav("hi.wav", 0.3, rate=192_000),
        "mask_black": png("black.png", 64, 48, (0, 0, 0, 255)),
        "mask_clear": png("clear.png", 64, 48, (255, 255, 255, 0)),
        "mask_white": png("white.png", 64, 48, (255, 255, 255, 255)),
        "tiny_image": png("tiny.png", 8, 8, (90, 90, 90, 255)),
        "text_as_image": ("image/png", b"this is not a picture\n" * 10),
        "noise_as_video": ("video/mp4", bytes(range(256)) * 64),
    }


@pytest.fixture()
def env(tmp_path):
    return make_env(tmp_path)


# name: (route kind, field, media key, words every refusal message must contain)
REFUSED = {
    "image_decompression_bomb": ("image-to-video-multi", "image", "png_bomb", ["16000×16000", "megapixels"]),
    "mask_decompression_bomb": ("image-to-video-multi", "mask_image", "png_bomb", ["16000×16000", "megapixels"]),
    "video_field_given_a_png_bomb": ("video-to-video-multi", "video", "png_bomb", []),
    "flac_at_384_khz": ("image-to-video-multi", "left_audio", "flac_384k", ["384000 Hz", str(limits.MAX_SAMPLE_RATE)]),
    "audio_of_30_ms": ("image-to-video-multi", "right_audio", "wav_30ms", ["30 ms", "100 ms"]),
    "audio_at_2_khz": ("image-to-video-multi", "left_audio", "wav_2khz", ["2000 Hz", str(limits.MIN_SAMPLE_RATE)]),
    "audio_with_33_channels": ("image-to-video-multi", "left_audio", "wav_33ch",
                               ["33 channels", str(limits.MAX_AUDIO_CHANNELS)]),
    "all_black_mask": ("image-to-video-multi", "mask_image", "mask_black", ["empty"]),
    "fully_transparent_mask": ("image-to-video-multi", "mask_image", "mask_clear", ["empty"]),
    "image_of_8_pixels": ("image-to-video-multi", "image", "tiny_image", ["8×8", str(limits.MIN_SIDE)]),
    "text_file_as_image": ("image-to-video-multi", "image", "text_as_image", []),
    "noise_as_video": ("video-to-video-multi", "video", "noise_as_video", []),
}


def _payload(kind: str, field: str, value: str) -> dict:
    payload = body(**{field: value})
    if kind == "video-to-video-multi":
        payload.pop("image")
        payload.setdefault("video", "clip.mp4")
    return payload


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_input_is_refused_at_submit_fast_small_and_clean(env, media, case):
    kind, field, key, words = REFUSED[case]
    mime, data = media[key]
    payload = _payload(kind, field, _uri(mime, data))

    async def flow(client):
        with PeakMemory() as memory:
            started = time.perf_counter()
            status, reply = await post(client, SUBMIT.format(kind=kind), payload)
            elapsed = time.perf_counter() - started
        return status, reply, elapsed, memory.peak_extra
    status, reply, elapsed, extra = call(env["service"], flow)
    assert status == 400 and reply["code"] == 400 and reply["data"] is None, (case, reply)
    assert reply["message"].startswith(f"field '{field}': "), reply["message"]
    assert all(w in reply["message"] for w in words), reply["message"]
    assert str(env["tmp"]) not in reply["message"], reply["message"]  # no server paths
    assert elapsed < MAX_SECONDS_TO_REFUSE, f"{case}: {elapsed:.1f} s to refuse"
    assert extra < MAX_EXTRA_MEMORY, f"{case}: {extra / 2**20:.0f} MB extra memory"
    assert env["engine"].counter == 0  # nothing queued, nothing billed
    assert not any((env["inputs"] / "infinitetalk_api").glob("*")), "refused inputs left on disk"


@pytest.mark.parametrize("key,field", [("wav_8ch", "left_audio"), ("wav_192k", "right_audio"),
                                       ("mask_white", "mask_image")])
def test_unusual_but_valid_inputs_are_accepted(env, media, key, field):
    """8 channels (mixed down later), 192 kHz (the top rate, resampled later) and a mask marking
    everything are within the limits: queued, not refused, and the probe does not crash."""
    mime, data = media[key]

    async def flow(client):
        return await post(client, SUBMIT.format(kind="image-to-video-multi"), body(**{field: _uri(mime, data)}))
    status, reply = call(env["service"], flow)
    assert status == 200, reply
    assert env["engine"].counter == 1
    assert [p.name for p in (env["inputs"] / "infinitetalk_api" / reply["data"]["id"]).iterdir()] == \
        [f"{field}{'.png' if field == 'mask_image' else '.wav'}"]


def test_the_server_keeps_serving_after_every_refusal(env, media):
    async def flow(client):
        for case, (kind, field, key, _) in REFUSED.items():
            mime, data = media[key]
            status, _ = await post(client, SUBMIT.format(kind=kind), _payload(kind, field, _uri(mime, data)))
            assert status == 400, case
        return await post(client, SUBMIT.format(kind="image-to-video-multi"), body())
    status, reply = call(env["service"], flow)
    assert status == 200 and env["engine"].counter == 1, reply
