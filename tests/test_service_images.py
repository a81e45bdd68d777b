"""Truncated and corrupt pictures are refused at submit (400 naming the field, nothing queued, no file left),
because image loaders that fill missing rows would render them as partly black, billed videos."""
from __future__ import annotations

import base64
import struct
import zlib

import av
import numpy as np
import pytest

from infinitetalk.errors import InputError
from infinitetalk.video.image_check import check_image_complete
from service_support import _png, body, call, make_env, post, write_flat_png

SUBMIT = "/infinitetalk/v1/image-to-video-multi"


def encoded_image(path, codec: str, pix_fmt: str, fmt: str = "image2", width: int = 96, height: int = 64):
    """A noisy picture encoded by FFmpeg (PNG, JPEG, WebP, BMP)."""
    img = (np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def png_with_half_its_rows(path, width: int = 64, height: int = 48):
    """A PNG whose chunks are all whole and checksummed, but whose compressed rows stop half way."""
    rows = b"".join(b"\x00" + bytes((x * 3 + y) % 256 for x in range(width * 3)) for y in range(height))
    path.write_bytes(_png(width, height, 2, zlib.compress(rows[: len(rows) // 2])))
    return path


FORMATS = [("png", "png", "rgb24", "image2"), ("jpg", "mjpeg", "yuvj420p", "image2"),
           ("webp", "libwebp", "yuv420p", "webp"), ("bmp", "bmp", "bgr24", "image2")]


@pytest.mark.parametrize("ext,codec,pix,fmt", FORMATS)
def test_whole_pictures_pass_and_cut_off_ones_are_refused(tmp_path, ext, codec, pix, fmt):
    whole = encoded_image(tmp_path / f"whole.{ext}", codec, pix, fmt)
    assert check_image_complete(whole, "image").width == 96
    data = whole.read_bytes()
    for keep in (0.95, 0.6):
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(InputError, match="truncated or corrupt") as err:
            check_image_complete(cut, "image")
        assert err.value.input_name == "image"


def test_png_whose_rows_stop_early_is_refused_though_every_chunk_is_whole(tmp_path):
    with pytest.raises(InputError, match="pixel data ends after 50% of the picture"):
        check_image_complete(png_with_half_its_rows(tmp_path / "half.png"), "mask_image")


def crafted_png(width: int, height: int, depth: int, color: int, interlace: bool) -> bytes:
    """A PNG written by hand: rows of the (Adam7) passes, filter 0, a palette for colour type 3."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)] \
        if interlace else [(0, 0, 1, 1)]
    raw = b""
    for x0, y0, dx, dy in passes:
        xs, ys = range(x0, width, dx), range(y0, height, dy)
        if len(xs) and len(ys):
            row_bytes = (len(xs) * channels * depth + 7) // 8
            raw += (b"\x00" + bytes(i % 7 for i in range(row_bytes))) * len(ys)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, int(interlace))
    chunks = [(b"IHDR", ihdr)] + ([(b"PLTE", bytes(range(24)))] if color == 3 else []) + \
        [(b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
                                        for t, d in chunks)


@pytest.mark.parametrize("depth,color,interlace", [(8, 3, False), (4, 3, True), (16, 0, False), (16, 2, True),
                                                   (8, 6, True), (1, 0, True)])
def test_png_row_bytes_follow_depth_colour_and_adam7(tmp_path, depth, color, interlace):
    """Whole files of each kind pass; the same file with one row byte fewer is refused."""
    path = tmp_path / "x.png"
    path.write_bytes(crafted_png(53, 37, depth, color, interlace))
    check_image_complete(path, "image")
    data = crafted_png(53, 37, depth, color, interlace)
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    raw = zlib.decompress(data[start:start + length])
    short = zlib.compress(raw[:-1])
    idat = struct.pack(">I", len(short)) + b"IDAT" + short + struct.pack(">I", zlib.crc32(b"IDAT" + short))
    path.write_bytes(data[:start - 8] + idat + data[start + length + 4:])
    with pytest.raises(InputError, match="pixel data ends after"):
        check_image_complete(path, "image")


def test_truncated_image_or_mask_is_a_400_naming_the_field_and_nothing_stays(tmp_path):
    env = make_env(tmp_path)
    inputs = env["inputs"]
    jpeg = encoded_image(tmp_path / "two.jpg", "mjpeg", "yuvj420p").read_bytes()
    (inputs / "cut.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    png_with_half_its_rows(inputs / "half.png")
    mask = write_flat_png(tmp_path / "mask.png", 64, 48, (255, 255, 255, 255)).read_bytes()
    cut_mask = "data:image/png;base64," + base64.b64encode(mask[:-20]).decode()   # IDAT cut, IEND gone

    async def flow(client):
        return [await post(client, SUBMIT, body(image="cut.jpg")),
                await post(client, SUBMIT, body(image="half.png")),
                await post(client, SUBMIT, body(mask_image=cut_mask))]
    answers = call(env["service"], flow)
    assert [status for status, _ in answers] == [400, 400, 400], answers
    assert answers[0][1]["message"].startswith("field 'image': ") and "end marker" in answers[0][1]["message"]
    assert answers[1][1]["message"].startswith("field 'image': ") and "50% of the picture" in answers[1][1]["message"]
    assert answers[2][1]["message"].startswith("field 'mask_image': ") and "truncated" in answers[2][1]["message"]
    assert env["engine"].graphs == {}
    root = inputs / "infinitetalk_api"
    assert not root.exists() or not any(root.iterdir())
