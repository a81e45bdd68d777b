"""InfiniteTalkVideoCombine: frames and/or a finished InfiniteTalk video (+ audio) -> mp4 / webm / mov / gif in the output folder."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from infinitetalk.errors import InputError

from . import bridge, media
from .types import InfiniteTalkVideo

PIX_FMTS = ("yuv420p", "yuv444p", "yuv420p10le")
# name -> (PyAV encoder (None: the best H.264 one available), file suffix, what the preview is told it is)
CODECS = {"h264": (None, ".mp4", "video/h264-mp4"), "h265": ("libx265", ".mp4", "video/h265-mp4"),
          "vp9": ("libvpx-vp9", ".webm", "video/webm"), "prores": ("prores_ks", ".mov", "video/quicktime"),
          "gif": ("gif", ".gif", "image/gif")}
STREAM_NAMES = {"h264": "h264", "h265": "hevc"}  # name -> the decoder's name of such a stream (copied, not re-encoded)


def stored_pix_fmt(codec: str, pix_fmt: str) -> str:
    """The pixel format a codec stores: ProRes is 10-bit 4:2:2 (4:4:4 when asked), GIF is 8-bit palette RGB."""
    if codec == "prores":
        return "yuv444p10le" if pix_fmt == "yuv444p" else "yuv422p10le"
    return "rgb8" if codec == "gif" else pix_fmt


def _trimmed(chunks: Iterator[np.ndarray], limit: int | None) -> Iterator[np.ndarray]:
    sent = 0
    for chunk in chunks:
        if limit is not None:
            chunk = chunk[: max(0, limit - sent)]
        if len(chunk):
            sent += len(chunk)
            yield chunk
        if limit is not None and sent >= limit:
            return


def _retimed(chunks: Iterator[np.ndarray], source_fps: float, fps: float) -> Iterator[np.ndarray]:
    """The frames of a `source_fps` video shown at `fps`, same length: output frame i is the source frame on
    screen at time i / fps (repeated or skipped), so the audio stays in sync with the lips."""
    out, start = 0, 0
    for chunk in chunks:
        picks = []
        while (index := math.floor(out * source_fps / fps + 1e-9)) < start + len(chunk):
            picks.append(index - start)
            out += 1
        if picks:
            yield chunk[picks]
        start += len(chunk)


def _image_chunks(images: Any, height: int, width: int, chunk: int = 16) -> Iterator[np.ndarray]:
    for start in range(0, int(images.shape[0]), chunk):
        yield media.image_uint8(images[start:start + chunk], "images")[:, :height, :width]


class InfiniteTalkVideoCombine:
    """Saves the video (mp4 h264/h265, webm vp9, mov ProRes, gif) with ComfyUI's filename counter and shows it."""

    DESCRIPTION = ("Saves the video to ComfyUI's output folder as mp4 (h264 or h265, 8 or 10 bit, aac audio), webm "
                   "(vp9, Opus audio), mov (ProRes 422 HQ) or gif "
                   "and previews it. Takes the sampler's 'video' (streamed from disk, any length) and/or an IMAGE "
                   "batch, plus optional audio. A video already in the chosen codec, pixel format and fps, without new "
                   "frames or audio, is copied as is (no re-encode). The graph that made it is embedded either way: drop the "
                   "mp4 on ComfyUI to open it.")
    CATEGORY = "InfiniteTalk"
    SEARCH_ALIASES = ["InfiniteTalk", "save mp4", "save webm", "save gif", "prores", "video combine"]  # node search
    FUNCTION = "combine"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the saved file.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "filename_prefix": ("STRING", {"default": "InfiniteTalk/video", "tooltip":
                                    "File name prefix in the output folder (a counter is appended; folders allowed)."}),
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.01, "round": 0.001,
                                  "tooltip": "Frame rate of the file, decimals allowed (29.97, 23.976). InfiniteTalk makes "
                                  "25 fps: at another rate its video keeps its length and lip sync (frames are "
                                  "repeated or skipped); IMAGE frames are shown at this rate."}),
                "codec": (list(CODECS), {"default": "h264", "tooltip":
                          "h264 (mp4) plays everywhere; h265 (HEVC, mp4) is about half the size at the same "
                          "quality but slower to encode and not played by some browsers; vp9 (webm, Opus audio) "
                          "for the web; prores (mov, 10-bit 4:2:2 HQ) for editing; gif (no sound)."}),
                "crf": ("INT", {"default": 19, "min": 0, "max": 51, "tooltip":
                                "Quality: lower = better and bigger (h264 19 is visually lossless-ish; h265 "
                                "reaches the same near 23)."}),
                "pix_fmt": (list(PIX_FMTS), {"default": "yuv420p", "tooltip":
                            "yuv420p plays everywhere; yuv444p keeps full colour detail; yuv420p10le is 10-bit "
                            "(smoother gradients, for h265 or editing; many players lack 10-bit h264)."}),
                "trim_to_audio": ("BOOLEAN", {"default": True, "tooltip":
                                  "Cut the video to the audio's length (else the audio is cut or padded with silence to the video's)."}),
            },
            "optional": {
                "video": ("INFINITETALK_VIDEO", {"tooltip": "The InfiniteTalk sampler's finished video."}),
                "images": ("IMAGE", {"tooltip": "Frames to encode; replace the video's frames when both are connected."}),
                "audio": ("AUDIO", {"tooltip": "Audio to mux; replaces the video's own audio."}),
                "embed_workflow": ("BOOLEAN", {"default": True, "advanced": True, "tooltip":
                                   "Store the graph (prompt and workflow) in the file, so dropping it on ComfyUI "
                                   "opens its workflow (ComfyUI's --disable-metadata turns it off everywhere)."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def combine(self, filename_prefix: str, fps: float, crf: int, pix_fmt: str, trim_to_audio: bool,
                codec: str = "h264", video: InfiniteTalkVideo | None = None, images: Any = None,
                audio: dict | None = None, embed_workflow: bool = True, prompt: Any = None,
                extra_pnginfo: Any = None) -> dict:
        if video is None and images is None:
            raise InputError("images/video", "connect the sampler's 'video' or an IMAGE batch")
        if pix_fmt not in PIX_FMTS:
            raise InputError("pix_fmt", f"{pix_fmt!r} is not one of {', '.join(PIX_FMTS)}")
        if codec not in CODECS:
            raise InputError("codec", f"{codec!r} is not one of {', '.join(CODECS)}")
        if not 1.0 <= float(fps) <= 120.0:
            raise InputError("fps", f"{fps} is outside 1 .. 120")
        if images is not None:
            height, width, fps = int(images.shape[1]), int(images.shape[2]), float(fps)
            if stored_pix_fmt(codec, pix_fmt).startswith(("yuv420p", "yuv422p")):  # subsampled chroma: even sizes
                height, width = height - height % 2, width - width % 2
        else:
            height, width, fps = video.height, video.width, float(fps)
        encoder, suffix, kind = CODECS[codec]
        metadata = _metadata(prompt, extra_pnginfo) if embed_workflow and not bridge.metadata_disabled() else {}
        folder, stem, subfolder = bridge.save_path(filename_prefix, width, height)
        path = folder / f"{stem}{suffix}"
        if images is None and audio is None and math.isclose(fps, video.fps) \
                and _stream_format(video.path) == (STREAM_NAMES.get(codec), pix_fmt):
            from infinitetalk.video.segments import remux

            remux(video.path, path, metadata)   # no re-encode, the graph embedded
        else:
            self._encode(path, width, height, fps, crf, stored_pix_fmt(codec, pix_fmt), encoder, trim_to_audio,
                         video, images, audio, metadata)
        item = {"filename": path.name, "subfolder": subfolder, "type": "output", "format": kind}
        return {"ui": {"images": [item], "animated": (True,)}, "result": (str(path),)}

    @staticmethod
    def _encode(path: Path, width: int, height: int, fps: float, crf: int, pix_fmt: str, encoder: str | None,
                trim_to_audio: bool, video: InfiniteTalkVideo | None, images: Any, audio: dict | None, metadata: dict) -> None:
        from infinitetalk.video.writer import Mp4Writer

        if images is not None:
            frame_count, chunks = int(images.shape[0]), _image_chunks(images, height, width)
        else:   # at another fps the video keeps its length and its sync: frames are repeated or skipped
            frame_count = math.ceil(video.frames * fps / video.fps - 1e-9)
            chunks = _retimed(video.iter_frames(), video.fps, fps)
        if audio is None and video is not None and video.has_audio:
            audio = video.audio()
        sound = media.audio_parts(audio, "audio") if audio is not None else None
        if sound is not None and trim_to_audio:
            # enough frames to carry all of the audio (the writer pads the last partial frame with silence)
            frame_count = min(frame_count, max(1, math.ceil(sound[0].shape[1] / sound[1] * fps - 1e-6)))
        if path.suffix == CODECS["gif"][1]:
            sound = None   # a GIF has no sound: the audio only decided its length
        with Mp4Writer(path, width, height, fps=fps, crf=int(crf), pix_fmt=pix_fmt, audio=sound,
                       metadata=metadata, codec=encoder) as writer:
            for chunk in _trimmed(chunks, frame_count):
                writer.write(chunk)


def _stream_format(path: Path) -> tuple[str, str]:
    """(codec, pixel format) of a video file's first video stream: a file already so is copied, not re-encoded."""
    import av

    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        return context.name, context.pix_fmt


def _metadata(prompt: Any, extra_pnginfo: Any) -> dict:
    """The graph that made the video, as core SaveVideo stores it (drag the mp4 back into ComfyUI)."""
    meta = {}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            meta[key] = json.dumps(value)
    return meta
