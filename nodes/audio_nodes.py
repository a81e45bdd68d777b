"""LoadTwoAudios: the left and right speakers' audio, from the input folder or from AUDIO inputs."""
from __future__ import annotations

from infinitetalk.errors import InputError

from . import bridge, media

_SIDES = ("left", "right")


def _load_file(name: str, input_name: str) -> dict:
    """AUDIO dict of one file in the input folder, at its own sample rate and channels."""
    from infinitetalk.audio.io import load_audio

    if not name or not bridge.input_exists(name):
        raise InputError(input_name, f"audio file {name!r} is not in the ComfyUI input folder; upload it or connect an AUDIO")
    try:
        clip = load_audio(bridge.input_path(name), input_name)
    except InputError:
        raise
    except Exception as err:  # PyAV decode errors etc.: name the input
        raise InputError(input_name, f"cannot decode {name!r} as audio ({err})") from err
    return media.audio_from_clip(clip.samples, clip.sample_rate)


class LoadTwoAudios:
    """Two speakers' tracks: left = the person on the left of the frame, right = the one on the right."""

    DESCRIPTION = ("Loads the left and the right speaker's audio (any format PyAV reads: wav, mp3, flac, m4a, "
                   "mp4...). A connected AUDIO input overrides the file chosen for that side. Outputs each track "
                   "at its own sample rate plus its length in seconds.")
    CATEGORY = "InfiniteTalk"
    SEARCH_ALIASES = ["InfiniteTalk", "two audios", "left right speaker audio", "load audio"]  # node search matches
    FUNCTION = "load"
    RETURN_TYPES = ("AUDIO", "AUDIO", "FLOAT", "FLOAT")
    RETURN_NAMES = ("left_audio", "right_audio", "left_seconds", "right_seconds")
    OUTPUT_TOOLTIPS = ("The left person's voice.", "The right person's voice.",
                       "Length of the left track in seconds.", "Length of the right track in seconds.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = bridge.input_files(("audio", "video"))
        return {
            "required": {
                "left_audio": (files, {"audio_upload": True, "tooltip":
                                       "Audio of the person on the LEFT of the picture (a file in ComfyUI's input folder)."}),
                "right_audio": (files, {"audio_upload": True, "tooltip":
                                        "Audio of the person on the RIGHT of the picture (a file in ComfyUI's input folder)."}),
            },
            "optional": {
                "left_audio_override": ("AUDIO", {"tooltip": "When connected, used instead of the left_audio file."}),
                "right_audio_override": ("AUDIO", {"tooltip": "When connected, used instead of the right_audio file."}),
                "stereo_audio": ("AUDIO", {"tooltip": "One stereo conversation instead of two tracks: the LEFT channel is "
                                           "the person on the left, the RIGHT channel the person on the right. When "
                                           "connected it overrides both sides; set the sampler's order to 'meanwhile'."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, left_audio: str, right_audio: str) -> bool | str:
        # Linked overrides are invisible here: an empty name passes (it must then be overridden at run time).
        for name, value in (("left_audio", left_audio), ("right_audio", right_audio)):
            if not isinstance(value, str):
                return f"{name}: expected a file name from the input folder"
            if value and not bridge.input_exists(value):
                return f"{name}: audio file {value!r} is not in the ComfyUI input folder"
        return True

    @classmethod
    def IS_CHANGED(cls, left_audio: str, right_audio: str, **_) -> str:
        stamps = []
        for name in (left_audio, right_audio):
            path = bridge.input_path(name) if name and bridge.input_exists(name) else None
            stamps.append(f"{name}:{path.stat().st_mtime_ns if path else 'missing'}")
        return "|".join(stamps)

    def load(self, left_audio: str, right_audio: str, left_audio_override: dict | None = None,
             right_audio_override: dict | None = None, stereo_audio: dict | None = None) -> tuple:
        if stereo_audio is not None:
            return self._split(stereo_audio)
        tracks = []
        for side, name, override in (("left", left_audio, left_audio_override), ("right", right_audio, right_audio_override)):
            if override is not None:
                samples, rate = media.audio_parts(override, f"{side}_audio_override")
                audio = media.audio_from_clip(samples, rate)
            else:
                audio = _load_file(name, f"{side}_audio")
            if media.audio_seconds(audio) <= 0:
                raise InputError(f"{side}_audio", "the audio track is empty")
            tracks.append(audio)
        return (tracks[0], tracks[1], media.audio_seconds(tracks[0]), media.audio_seconds(tracks[1]))

    @staticmethod
    def _split(stereo_audio: dict) -> tuple:
        """Left and right channels of one conversation file as two mono tracks (engine: audio.stereo)."""
        import torch

        from infinitetalk.audio.io import AudioClip
        from infinitetalk.audio.stereo import split_stereo

        samples, rate = media.audio_parts(stereo_audio, "stereo_audio")
        left, right = split_stereo(AudioClip(torch.as_tensor(samples), rate), "stereo_audio")
        tracks = [media.audio_from_clip(clip.samples, clip.sample_rate) for clip in (left, right)]
        return (tracks[0], tracks[1], media.audio_seconds(tracks[0]), media.audio_seconds(tracks[1]))
