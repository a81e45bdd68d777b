"""Real-ComfyUI tier: our loaded models are an entry of core's memory manager (comfy.model_management), so core and
InfiniteTalk free each other. Runs in ComfyUI's own Python against its real model_management (CPU): a core model
loaded before a job makes way for ours; ours is listed among core's loaded models after the job; when core needs
the memory for a core model loaded after the job, ours is let go, and the next job loads it again.
Skipped unless COMFYUI_DIR is set."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from comfy_server import COMFYUI_DIR, COMFYUI_PYTHON, ROOT, TINY_LOADER

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (no ComfyUI source tree)")]

SCRIPT = r"""
import importlib.util, json, math, sys
import torch
from comfy.cli_args import args
args.cpu = True   # as `main.py --cpu`
import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

models_dir, root, loader_values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for name in ("diffusion_models", "model_patches", "loras", "audio_encoders", "wav2vec2", "text_encoders",
             "clip_vision", "vae"):
    folder_paths.add_model_folder_path(name, f"{models_dir}/{name}", is_default=True)
spec = importlib.util.spec_from_file_location("infinitetalk_multi", f"{root}/__init__.py",
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["infinitetalk_multi"] = pack; spec.loader.exec_module(pack)
nodes = pack.NODE_CLASS_MAPPINGS

def core_model():
    return comfy.model_patcher.ModelPatcher(torch.nn.Linear(64, 64), load_device=mm.get_torch_device(),
                                            offload_device=torch.device("cpu"))

def listed():
    return [type(m).__name__ for m in mm.loaded_models()]

def audio(seconds, freq):
    t = torch.arange(int(seconds * 16000)) / 16000
    return {"waveform": (0.3 * torch.sin(2 * math.pi * freq * t))[None, None], "sample_rate": 16000}

seen = {}
before = core_model()
mm.load_models_gpu([before])
seen["before_job"] = listed()
(choice,) = nodes["InfiniteTalkModelLoader"]().load(lora_strength=1.0, **loader_values)
job = dict(prompt="two people", negative_prompt="", order="left_right", resolution="480p", seed=3, preset="quality",
           steps=1, text_guidance=5.0, audio_guidance=4.0, color_strength=1.0, size_scale=0.05)
nodes["InfiniteTalkMultiSampler"]().generate(choice, audio(0.3, 200.0), audio(0.3, 300.0),
                                             image=torch.rand(1, 64, 96, 3), **job)
entry = choice.core_entry()
seen["after_job"] = listed()
seen["entry_sizes"] = [entry.model_size(), entry.loaded_size()]
first = choice._bundle
after = core_model()
mm.load_models_gpu([after])
seen["core_model_after_job"] = listed()
mm.free_memory(1e30, mm.get_torch_device())      # core needs the memory (e.g. a big model's first load)
seen["after_core_freed"] = listed()
seen["ours_let_go"] = not choice.holds(first)
nodes["InfiniteTalkMultiSampler"]().generate(choice, audio(0.3, 200.0), audio(0.3, 300.0),
                                             image=torch.rand(1, 64, 96, 3), **dict(job, seed=4))
seen["reloaded"] = choice._bundle is not None and choice._bundle is not first
seen["after_second_job"] = listed()
print("SEEN " + json.dumps(seen))
"""


def test_core_and_infinitetalk_free_each_other(tiny_models, tmp_path):
    env = {**os.environ, "PYTHONPATH": COMFYUI_DIR}
    done = subprocess.run([COMFYUI_PYTHON, "-c", SCRIPT, str(tiny_models), str(ROOT), json.dumps(TINY_LOADER)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SEEN ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    seen = json.loads(lines[-1][5:])
    assert seen["before_job"] == ["ModelPatcher"]
    assert seen["after_job"] == ["CoreEntry"]                     # the core model made way; ours is listed
    size, loaded = seen["entry_sizes"]
    assert size > 0 and loaded == size                           # on a CPU device all of it counts as loaded
    assert sorted(seen["core_model_after_job"]) == ["CoreEntry", "ModelPatcher"]
    assert seen["after_core_freed"] == [] and seen["ours_let_go"]   # core freed ours like its own
    assert seen["reloaded"] and seen["after_second_job"] == ["CoreEntry"]
