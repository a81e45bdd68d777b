"""Prompts: the reference's defaults (`wan/configs/wan_multitalk_14B.py`) and per-window prompts (one per line)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from ..errors import InputError

T = TypeVar("T")

__all__ = ["DEFAULT_PROMPT", "DEFAULT_NEGATIVE_PROMPT", "join_prompts", "window_prompts", "prompt_for_window"]

DEFAULT_PROMPT = "Two people are talking to each other."

# InfiniteTalk's English negative prompt (the Chinese Wan default is not used by InfiniteTalk).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


def join_prompts(prompt: str | list[str] | tuple[str, ...]) -> str:
    """The one text form of a prompt: a list of per-window prompts becomes one prompt per line."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise InputError("prompt", f"expected a string or a non-empty list of strings, got {type(prompt).__name__}")
    for i, p in enumerate(prompt):
        if "\n" in p or not p.strip():
            raise InputError("prompt", f"item {i} of the prompt list is {'empty' if not p.strip() else 'multi-line'}; "
                                       "each item is one window's prompt (one line)")
    return "\n".join(p.strip() for p in prompt)


def window_prompts(prompt: str) -> list[str]:
    """The prompt of each successive window, one per non-empty line; the last one repeats for the rest.

    A prompt without line breaks applies to every window (the reference's single prompt)."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    return lines or [prompt]


def prompt_for_window(prompts: Sequence[T], window: int) -> T:
    """Window `window`'s prompt (or its embedding): its own line, or the last line once the lines run out."""
    return prompts[min(window, len(prompts) - 1)]
