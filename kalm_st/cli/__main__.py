"""``python -m kalm_st.cli`` (what ``torchrun -m kalm_st.cli train ...`` runs)."""

from __future__ import annotations

from kalm_st.cli import main

raise SystemExit(main())
