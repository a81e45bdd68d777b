"""Which of requirements.txt's runtime modules the running Python lacks, said once in one sentence.

A ComfyUI whose Python misses e.g. `soxr` used to load the package and then answer every job with
`ModuleNotFoundError`. `missing_modules()` asks `importlib.util.find_spec` only (nothing is imported, so it
is cheap at ComfyUI start and per API request); `missing_message()` names what is missing and the command
that installs it. Stdlib only: it must work exactly when the dependencies do not. torch is not checked
(ComfyUI brings it; requirements.txt says never to let pip pick another build).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["REQUIRED_MODULES", "REQUIREMENTS_FILE", "missing_modules", "missing_message", "install_command"]

# import name -> the requirement in requirements.txt that provides it
REQUIRED_MODULES: dict[str, str] = {
    "numpy": "numpy", "safetensors": "safetensors", "av": "av", "soxr": "soxr",
    "sentencepiece": "sentencepiece", "gguf": "gguf",
}
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "requirements.txt"


def missing_modules() -> tuple[str, ...]:
    """Import names of REQUIRED_MODULES that this Python cannot find (a finder that raises counts as missing)."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return tuple(missing)


def install_command(public: bool = False) -> str:
    """`<python> -m pip install -r <requirements.txt>`; `public` hides this machine's paths (for API clients)."""
    if public:
        return "<the Python that runs this server> -m pip install -r <this package's requirements.txt>"
    return f"{sys.executable} -m pip install -r {REQUIREMENTS_FILE}"


def missing_message(public: bool = False) -> str | None:
    """The sentence for logs, node errors and the API's 503, or None when nothing is missing.

    `public=True` is the API's form: the same sentence without this machine's absolute paths."""
    missing = missing_modules()
    if not missing:
        return None
    names = ", ".join(REQUIRED_MODULES[m] for m in missing)
    return (f"InfiniteTalk cannot run: the Python of this server lacks {names} (from this package's "
            f"requirements.txt); install with `{install_command(public)}` and restart the server")
