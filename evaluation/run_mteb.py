"""Run MTEB on a model with the KaLM instructions: ``python evaluation/run_mteb.py MODEL --tasks local --output DIR``.

Same as ``kalm-st eval``; see ``kalm_st.evaluation.evaluate_model``.
"""

from __future__ import annotations

import sys

from kalm_st.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
