"""Golden-case parity runner: `python -m infinitetalk.parity CASE_DIR --out OUT_DIR`.

Contract: ../shared/golden/README.md §4. Each component kind lives in `parity/kinds/<kind>.py` and
exposes `run(case: Case) -> Outputs`; kinds build their component through the same loaders users hit.
"""
from .runner import Case, Outputs, main, run_case

__all__ = ["Case", "Outputs", "main", "run_case"]
