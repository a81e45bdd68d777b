"""A Python lacking one of requirements.txt's packages: the package still imports, says once which package is
missing and how to install it, nodes fail with that sentence, and every API route answers 503 with it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from infinitetalk import dependencies

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Put first on sys.meta_path by sitecustomize: makes `import soxr` (and find_spec) fail as if not installed.
BLOCKER = '''
import os, sys

class _Missing:
    blocked = set(filter(None, os.environ.get("INFINITETALK_TEST_BLOCK", "").split(",")))

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Missing())
'''

CHILD = r'''
import asyncio, json, logging, sys, tempfile
from pathlib import Path

logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s", stream=sys.stdout)
import nodes                                       # the ComfyUI entry's node package, outside ComfyUI
import infinitetalk.service.app                    # the API's modules import without soxr
from infinitetalk.dependencies import missing_message
from service_support import call, make_env, body, post

out = {"registered": sorted(nodes.NODE_CLASS_MAPPINGS), "message": missing_message(),
       "public": missing_message(public=True)}
loader = nodes.NODE_CLASS_MAPPINGS["InfiniteTalkLoadTwoAudios"]()
try:
    getattr(loader, loader.FUNCTION)(left_audio="a.wav", right_audio="b.wav")
except RuntimeError as exc:
    out["node_error"] = str(exc)
env = make_env(Path(tempfile.mkdtemp()))

async def requests(client):
    replies = [await post(client, "/infinitetalk/v1/image-to-video-multi", body())]
    for method, path in (("GET", "/infinitetalk/v1/predictions/x/status"), ("GET", "/infinitetalk/v1/predictions/x/result"),
                         ("POST", "/infinitetalk/v1/predictions/x/cancel"), ("GET", "/infinitetalk/v1/nothing")):
        resp = await client.request(method, path)
        replies.append((resp.status, await resp.json()))
    return replies

out["replies"] = call(env["service"], requests, is_open=True)
print("RESULT " + json.dumps(out))
'''


def _run_without(tmp_path: Path, module: str) -> tuple[dict, str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "INFINITETALK_TEST_BLOCK": module,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stdout


def test_nothing_missing_here():
    assert dependencies.missing_modules() == () and dependencies.missing_message() is None


def test_a_missing_soxr_is_said_once_and_answered_with_503(tmp_path):
    out, stdout = _run_without(tmp_path, "soxr")
    message, public = out["message"], out["public"]
    assert "lacks soxr" in message and "numpy" not in message
    assert f"{sys.executable} -m pip install -r {dependencies.REQUIREMENTS_FILE}" in message
    assert "this package's requirements.txt" in public and str(ROOT) not in public and sys.executable not in public
    logged = [ln for ln in stdout.splitlines() if ln.startswith("LOG ") and message in ln]
    assert logged == [f"LOG infinitetalk {message}"], stdout       # logged once, at load
    assert len(out["registered"]) == 5                             # every node registered ...
    assert out["node_error"] == message                            # ... and says the sentence when run
    for status, reply in out["replies"]:                           # every route: 503 with the public sentence
        assert status == 503 and reply["code"] == 503 and reply["message"] == public, reply


def test_two_missing_packages_are_named_together(tmp_path):
    out, _ = _run_without(tmp_path, "soxr,gguf")
    assert "lacks soxr, gguf" in out["message"]


def test_the_cli_says_the_sentence_instead_of_a_traceback(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "INFINITETALK_TEST_BLOCK": "soxr", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "infinitetalk", "demo", "--out", str(tmp_path / "d.mp4")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "lacks soxr" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
