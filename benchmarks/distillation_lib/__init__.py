"""The code of ``benchmarks/distillation.py`` beyond what it reuses from ``benchmarks/ablation_lib``, and its constants.

- ``report``: ``docs/distillation.md`` from the stored results (tables, goals, runs, hyperparameters);
- ``calibrate``: the per-step and encoding speeds that size the parts (``--calibrate``).
"""

from __future__ import annotations

from pathlib import Path

from ablation_lib.config import ROOT

CONFIG_DIR = Path(__file__).resolve().parents[1] / "distillation"
ARM_NAMES: tuple[str, ...] = ("arm1_infonce", "arm2_paper_kd", "arm3_inbatch_kd", "arm4_embedding_kd")
PARTS: dict[str, str] = {"a": "minilm", "b": "smollm2"}
"""Part -> its student (the part's name is also its mode in common.yaml / smoke.yaml)."""
DEFAULT_WORK_DIR = ROOT / "outputs" / "distillation"
SMOKE_WORK_DIR = ROOT / "outputs" / "distillation-smoke"
DOC_PATH = ROOT / "docs" / "distillation.md"
EMULATION_VARS: tuple[str, ...] = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""The variables that emulate an AVX2-only CPU (recorded with each part's wall time)."""
