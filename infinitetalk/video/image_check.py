"""Whole-image checks at submit: a truncated or corrupt picture is refused, not rendered half black.

Image loaders that fill missing rows (ComfyUI's, FFmpeg's PNG decoder) accept a cut-off file and the job
would complete as a partly black, billed video. So after the header probe (`probe_image`, which bounds the
work by MAX_PIXELS) the picture is decoded once, and the formats whose decoders do not notice a missing end
are checked from their structure: a PNG's compressed rows must inflate to exactly the rows its header
announces, a JPEG's main scan must reach its end marker, a WebP file must be as long as its header says.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import av

from ..errors import InputError, require_file
from ..limits import MAX_PIXELS
from .reader import ImageInfo, probe_image

__all__ = ["check_image_complete"]

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20   # inflated bytes per step: memory stays bounded whatever the rows add up to


def check_image_complete(path: str | os.PathLike, field: str = "image") -> ImageInfo:
    """probe_image, then prove the whole picture is there and decodes; InputError(field) saying what is
    missing otherwise. Time and memory are bounded by the pixel limit the probe enforced."""
    info = probe_image(path, field)
    p = require_file(path, field)
    missing = {"png": _png_missing, "jpeg": _jpeg_missing, "webp": _riff_missing}.get(info.format)
    problem = missing(p) if missing else None
    if problem:
        raise InputError(field, f"{p} is truncated or corrupt: {problem}; send the complete file")
    _decode_once(p, field)
    return info


def _decode_once(p: Path, field: str) -> None:
    """Decode the first frame (FFmpeg, capped at MAX_PIXELS); a decoder error is a corrupt file."""
    try:
        with av.open(str(p), mode="r", options={"max_pixels": str(MAX_PIXELS)}) as container:
            if not container.streams.video:
                raise InputError(field, f"{p} contains no image")
            stream = container.streams.video[0]
            stream.codec_context.options = {"max_pixels": str(MAX_PIXELS)}
            frame = next(container.decode(stream), None)
    except av.FFmpegError as exc:
        raise InputError(field, f"{p} is truncated or corrupt: it does not decode ({exc})") from None
    if frame is None:
        raise InputError(field, f"{p} is truncated or corrupt: no picture decodes from it")


def _png_rows_bytes(width: int, height: int, depth: int, color: int, interlaced: bool) -> int:
    """Bytes the inflated IDAT data must hold: each row (of each Adam7 pass) is a filter byte + its pixels."""
    bits = _PNG_CHANNELS[color] * depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            total += h * (1 + -(-w * bits // 8))
    return total


def _png_missing(p: Path) -> str | None:
    """What a PNG lacks: chunks cut off, a bad CRC, or compressed rows that end early."""
    with open(p, "rb") as f:
        f.seek(8)
        expected, inflater, inflated = None, zlib.decompressobj(), 0
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, tag = struct.unpack(">I4s", head)
            data = f.read(length)
            crc = f.read(4)
            if len(data) < length or len(crc) < 4:
                return f"its {tag.decode('latin-1')!r} chunk is cut off"
            if struct.unpack(">I", crc)[0] != zlib.crc32(tag + data) & 0xFFFFFFFF:
                return f"its {tag.decode('latin-1')!r} chunk fails its checksum"
            if tag == b"IHDR" and len(data) >= 13:
                w, h, depth, color, _c, _f, interlace = struct.unpack(">IIBBBBB", data[:13])
                if color not in _PNG_CHANNELS:
                    return f"its colour type {color} is not a PNG colour type"
                expected = _png_rows_bytes(w, h, depth, color, bool(interlace))
            elif tag == b"IDAT" and expected is not None and not inflater.eof:
                try:
                    inflated += _inflate_count(inflater, data)
                except zlib.error as exc:
                    return f"its compressed pixel data is corrupt ({exc})"
            elif tag == b"IEND":
                break
    if expected is None:
        return "it has no image header (IHDR)"
    if inflated < expected:
        return f"its pixel data ends after {inflated * 100 // max(1, expected)}% of the picture"
    return None


def _inflate_count(inflater: "zlib._Decompress", data: bytes) -> int:
    """Inflate `data` in bounded steps, counting (not keeping) the output."""
    count = len(inflater.decompress(data, _INFLATE_STEP))
    while inflater.unconsumed_tail and not inflater.eof:
        count += len(inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP))
    return count


def _jpeg_missing(p: Path) -> str | None:
    """A JPEG whose main image data never reaches its end marker (EOI) was cut off."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        f.seek(2)
        while True:   # walk the segments before the first scan (an EXIF thumbnail inside APP1 is skipped whole)
            b = f.read(1)
            if not b:
                return "it ends before its image data"
            if b != b"\xff":
                continue
            marker = f.read(1)
            while marker == b"\xff":
                marker = f.read(1)
            if not marker or marker == b"\xd9":
                return "it ends before its image data"
            if marker[0] in (0x01, 0xD8) or 0xD0 <= marker[0] <= 0xD7:
                continue
            raw = f.read(2)
            if len(raw) < 2:
                return "a segment header is cut off"
            (length,) = struct.unpack(">H", raw)
            if f.tell() + length - 2 > size:
                return "a segment is cut off"
            f.seek(length - 2, 1)
            if marker == b"\xda":   # start of scan: the end marker must follow somewhere after it
                break
        carry = b""
        while block := f.read(1 << 20):
            if b"\xff\xd9" in carry + block:
                return None
            carry = block[-1:]
    return "its image data has no end marker (EOI)"


def _riff_missing(p: Path) -> str | None:
    with open(p, "rb") as f:
        head = f.read(8)
    declared = struct.unpack("<I", head[4:8])[0] + 8 if len(head) == 8 else 0
    size = p.stat().st_size
    return f"it is {size} bytes; its header announces {declared}" if size < declared else None

