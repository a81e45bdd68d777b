"""Golden-case parity runner: `python -m infinitetalk.parity CASE_DIR --out OUT_DIR`.

Contract: the golden cases' README (the folder named by INFINITETALK_GOLDEN_DIR), §4. Each component kind lives in `parity/kinds/<kind>.py` and
exposes `run(case: Case) -> Outputs`; kinds build their component through the same loaders users hit.
"""
from .runner import Case, Outputs, main, run_case

__all__ = ["Case", "Outputs", "main", "run_case"]
