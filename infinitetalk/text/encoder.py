"""Prompt -> umT5 context rows for the DiT (model + tokenizer together; no file I/O)."""
from __future__ import annotations

import torch

from ..models.t5 import T5Encoder
from .tokenizer import UMT5Tokenizer

__all__ = ["TextEncoder"]


class TextEncoder:
    """`encode(prompt)` -> [L_real, dim]: the rows of the real tokens (prompt + `</s>`), as Wan's
    T5EncoderModel returns them; the DiT zero-pads to 512 itself.

    The reference runs all 512 positions with padded keys masked out. Since masked keys get exactly
    zero attention weight and the position bias depends only on offsets, the real rows are the same
    when only the real tokens are run, so that is what happens here (the tests check the equality).
    """

    def __init__(self, model: T5Encoder, tokenizer: UMT5Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """[L_real, dim] in the model's compute dtype, on the model's device."""
        ids, mask = self.tokenizer(prompt, pad=False)
        return self.model(ids.to(self.device), mask.to(self.device))[0]
