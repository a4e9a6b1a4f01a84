"""Push a model with a kalm-st model card: ``python evaluation/push_to_hub.py MODEL REPO_ID [--private] [--dry-run]``.

Same as ``kalm-st push``; see ``kalm_st.evaluation.push_model``. The token comes from HF_TOKEN or ``hf auth login``.
"""

from __future__ import annotations

import sys

from kalm_st.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["push", *sys.argv[1:]]))
