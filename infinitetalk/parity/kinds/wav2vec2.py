"""Golden kind `wav2vec2`: waveform normalisation and the 25 fps feature stack, through the real loader."""
from __future__ import annotations

import torch

from ...loaders.wav2vec2 import load_wav2vec2
from ...models.wav2vec2 import frames_for, normalize_waveform
from ..runner import Case, Outputs


def run(case: Case) -> Outputs:
    model = load_wav2vec2(case.weights_path, config=case.config, dtype=torch.float32)
    inputs = case.inputs()
    raw = inputs["raw_waveform"]
    call = case.call
    video_length = int(call.get("video_length", frames_for(raw.shape[0], call.get("sample_rate", 16000),
                                                            call.get("fps", 25))))
    normalized = normalize_waveform(raw)
    features = model(inputs.get("waveform", normalized), video_length)
    return Outputs(tensors={"normalized": normalized, "features": features})
