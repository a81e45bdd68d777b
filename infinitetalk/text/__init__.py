"""umT5 tokenizer (sentencepiece), prompt -> context encoder wrapper, and prompt defaults."""
from .encoder import TextEncoder
from .prompts import DEFAULT_NEGATIVE_PROMPT
from .tokenizer import TEXT_LENGTH, UMT5Tokenizer, clean_prompt

__all__ = ["TextEncoder", "UMT5Tokenizer", "DEFAULT_NEGATIVE_PROMPT", "TEXT_LENGTH", "clean_prompt"]
