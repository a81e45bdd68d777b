"""Sizes shared by the tiny components so that they plug into each other like the real ones.

Real model -> tiny stand-in (what must agree across components):
- umT5-XXL dim 4096            -> T5_DIM, which is also the DiT's text_dim
- CLIP ViT-H width 1280, 257 tokens (224 px / patch 14) -> CLIP_DIM (DiT image width); 224/14 kept
- wav2vec2 12 layers x 768     -> AUDIO_LAYERS x AUDIO_CHANNELS (DiT audio_proj input layout)
- VAE z_dim 16, stride (4, 8, 8) -> unchanged; only the VAE base width shrinks
"""
T5_VOCAB = 512
T5_DIM = 32
T5_HEADS = 4
T5_FFN = 64
T5_LAYERS = 2
T5_BUCKETS = 32

CLIP_DIM = 32
CLIP_HEADS = 2
CLIP_LAYERS = 3
CLIP_MLP_RATIO = 2.0

AUDIO_LAYERS = 2
AUDIO_CHANNELS = 32
AUDIO_HEADS = 2
AUDIO_FFN = 64
AUDIO_CONV_DIM = 32

DIT_DIM = 64
DIT_FFN = 128
DIT_HEADS = 2
DIT_LAYERS = 2
DIT_AUDIO_INTERMEDIATE = 16
DIT_AUDIO_TOKEN_DIM = 32
DIT_AUDIO_CONTEXT_TOKENS = 4

VAE_DIM = 8
VAE_Z_DIM = 16
