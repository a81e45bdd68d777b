"""ComfyUI nodes (classic API): thin classes that validate inputs and call into `infinitetalk`.

Node modules import siblings relatively (ComfyUI has its own top-level `nodes` module) and nothing
from ComfyUI at import time; ComfyUI services are reached through `bridge`.
Every node id starts with `InfiniteTalk` (ids are global across all installed packs); display names
are what users read and stay short.
"""
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
    "InfiniteTalkVideoCombine": "InfiniteTalk Video Combine (mp4)",
}

register_job_api()
