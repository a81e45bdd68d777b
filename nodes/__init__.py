"""ComfyUI nodes (classic API): thin classes that validate inputs and call into `infinitetalk`.

Node modules import siblings relatively (ComfyUI has its own top-level `nodes` module) and nothing
from ComfyUI at import time; ComfyUI services are reached through `bridge`.
Every node id starts with `InfiniteTalk` (ids are global across all installed packs); display names
are what users read and stay short.

A Python lacking one of requirements.txt's packages still registers every node (workflows open and show
what they need); the package logs once which package is missing and how to install it, and each node
then fails with that sentence when it runs, as the job API answers 503 with it.
"""
import functools
import logging

from infinitetalk.dependencies import missing_message

from .audio_nodes import LoadTwoAudios
from .mask_nodes import MaskFromRegion
from .model_nodes import InfiniteTalkModelLoader
from .sampler_nodes import InfiniteTalkMultiSampler
from .video_nodes import InfiniteTalkVideoCombine
from .bridge import register_job_api

NODE_CLASS_MAPPINGS: dict = {
    "InfiniteTalkLoadTwoAudios": LoadTwoAudios,
    "InfiniteTalkMaskFromRegion": MaskFromRegion,
    "InfiniteTalkModelLoader": InfiniteTalkModelLoader,
    "InfiniteTalkMultiSampler": InfiniteTalkMultiSampler,
    "InfiniteTalkVideoCombine": InfiniteTalkVideoCombine,
}

NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "InfiniteTalkLoadTwoAudios": "Load Two Audios (left / right speaker)",
    "InfiniteTalkMaskFromRegion": "InfiniteTalk Mask From Region",
    "InfiniteTalkModelLoader": "InfiniteTalk Model Loader",
    "InfiniteTalkMultiSampler": "InfiniteTalk Multi Sampler (long video)",
    "InfiniteTalkVideoCombine": "InfiniteTalk Video Combine (mp4, webm, ProRes, gif)",
}



def _refusing(cls: type, message: str) -> type:
    """`cls` whose run function raises `message` first (only used when a dependency is missing)."""
    run = getattr(cls, cls.FUNCTION)

    @functools.wraps(run)
    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    setattr(cls, cls.FUNCTION, refuse)
    return cls


_MISSING = missing_message()
if _MISSING:
    logging.getLogger("infinitetalk").error(_MISSING)
    NODE_CLASS_MAPPINGS = {name: _refusing(cls, _MISSING) for name, cls in NODE_CLASS_MAPPINGS.items()}

register_job_api()
