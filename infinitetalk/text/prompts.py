"""Prompt defaults of the reference (`wan/configs/wan_multitalk_14B.py`)."""
from __future__ import annotations

__all__ = ["DEFAULT_NEGATIVE_PROMPT"]

# InfiniteTalk's English negative prompt (the Chinese Wan default is not used by InfiniteTalk).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)
