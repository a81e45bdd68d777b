"""umT5 tokenizer: sentencepiece model + the reference's prompt cleaning, HF-T5 conventions.

Wan tokenises with `transformers` (T5TokenizerFast for google/umt5-xxl, `clean='whitespace'`): HTML
entities unescaped, whitespace runs collapsed, `</s>` appended, truncation to 512 tokens including
`</s>`, padding with id 0. The same ids come from the sentencepiece model directly, which is all this
needs (no `transformers`, no `ftfy`; ftfy's mojibake repair is the one cleaning step not reproduced).
"""
from __future__ import annotations

import html
import os
import re
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["UMT5Tokenizer", "clean_prompt", "TEXT_LENGTH"]

TEXT_LENGTH = 512  # Wan's text_len: prompts are padded/truncated to this many tokens
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: HTML-unescape twice, collapse whitespace, strip."""
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """Prompt -> token ids of a umT5 sentencepiece model (`</s>` appended, pad id 0)."""

    def __init__(self, model_proto: bytes, source: str = "sentencepiece model", max_length: int = TEXT_LENGTH):
        import sentencepiece

        self.source = source
        self.max_length = max_length
        self._proto = bytes(model_proto)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, TypeError, OSError) as exc:
            raise CheckpointError(source, f"not a sentencepiece tokenizer model: {exc}") from exc
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise CheckpointError(source, "sentencepiece model has no </s> (end-of-sequence) piece")
        self.pad_id = max(self.sp.pad_id(), 0)

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = TEXT_LENGTH) -> "UMT5Tokenizer":
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(p, "tokenizer file not found")
        return cls(p.read_bytes(), source=str(p), max_length=max_length)

    @classmethod
    def from_tensor(cls, data: torch.Tensor, source: str, max_length: int = TEXT_LENGTH) -> "UMT5Tokenizer":
        """From a uint8 tensor holding the model bytes (ComfyUI embeds it as `spiece_model`)."""
        return cls(data.detach().cpu().to(torch.uint8).numpy().tobytes(), source=source, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def serialized(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        """Ids of the cleaned prompt, truncated so that with `</s>` there are at most max_length."""
        ids = self.sp.encode(clean_prompt(text), out_type=int)
        return ids[: self.max_length - 1] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.eos_id, self.pad_id)])

    def __call__(self, text: str, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """ids and mask [1, L] int64; L = max_length when `pad`, else the real length."""
        ids = self.encode(text)
        n = len(ids)
        length = self.max_length if pad else n
        out = torch.full((1, length), self.pad_id, dtype=torch.long)
        out[0, :n] = torch.tensor(ids, dtype=torch.long)
        mask = torch.zeros((1, length), dtype=torch.long)
        mask[0, :n] = 1
        return out, mask
