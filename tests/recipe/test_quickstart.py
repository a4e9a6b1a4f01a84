"""The quickstart recipe (training/recipes/quickstart.yaml, what `kalm-st quickstart` runs) end to end on a tiny
backbone: every step, curation outputs feeding the stages, before/after scores, a kalm-v2 folder plain ST loads.

The real run (SmolLM2-135M) is documented in docs/quickstart.md; this checks the wiring in CI.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer

from kalm_st.cli import main
from kalm_st.evaluation.card import find_training_configs
from kalm_st.recipe.runner import MANIFEST

from .conftest import REPO_ROOT

TINY = "builtin:tiny-qwen2"
SMALL_TRAINING = ["max_steps=1", "per_device_train_batch_size=4"]


def _quickstart_argv(root: Path) -> list[str]:
    overrides = [f"output_dir={root / 'work'}", f"zero_shot.model={TINY}", "zero_shot.max_seq_length=128"]
    for step in ("zero_shot", "trained"):  # 100 STS-B dev pairs instead of the held-out sets, for time
        overrides += [f"{step}.data_dir=data/tiny/tiny_eval", f"{step}.tasks=[STSBenchmark]"]
    for stage in ("stage1", "stage2", "stage3"):
        overrides += [f"{stage}.set.args.{a}" for a in SMALL_TRAINING] + [f"{stage}.set.model.max_seq_length=128"]
    overrides.append(f"stage1.set.model.init_from={TINY}")
    return ["quickstart", "--output", str(root / "kalm-v2")] + [x for o in overrides for x in ("--set", o)]


@dataclass
class QuickstartRun:
    """One tiny quickstart run, with everything a user would see: stdout, stderr, warnings and log records."""

    root: Path
    stdout: str
    stderr: str
    warnings: list[warnings.WarningMessage]
    records: list[logging.LogRecord]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> QuickstartRun:
    root = tmp_path_factory.mktemp("quickstart")
    handler, stdout, stderr = _Records(), io.StringIO(), io.StringIO()
    logging.getLogger().addHandler(handler)
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the recipe names the bundled data relative to the clone's root
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(stdout), redirect_stderr(stderr):
            warnings.simplefilter("always")  # every warning a user's interpreter would show, not pytest's filters
            assert main(_quickstart_argv(root)) == 0
    finally:
        os.chdir(cwd)
        logging.getLogger().removeHandler(handler)
    return QuickstartRun(root, stdout.getvalue(), stderr.getvalue(), list(caught), handler.records)


def test_quickstart_recipe_end_to_end_on_a_tiny_backbone(quickstart_run: QuickstartRun) -> None:
    tmp_path, out = quickstart_run.root, quickstart_run.stdout
    assert "zero_shot" in out and "trained" in out and "STSBenchmark" in out

    work = tmp_path / "work"
    for step in ("zero_shot", "trained"):
        scores = json.loads((work / step / "scores.json").read_text())
        assert set(scores) == {"STSBenchmark"} and all(map(math.isfinite, scores.values()))
    # Stage-3 rows: MiniLM's embeddings of the anchor, the positive and the 2 mined / labelled negatives of every task.
    teacher = pq.read_table(work / "teacher" / "data.parquet").to_pydict()
    assert set(teacher["task"]) == {"STSBenchmark", "TrecQARetrieval", "Banking77Classification"}
    assert all(len(label) == 4 and all(len(v) == 384 for v in label) for label in teacher["label"])
    assert "negative_3" not in teacher
    negatives = zip(teacher["negative_1"], teacher["negative_2"], strict=True)
    assert all(p not in negs for p, negs in zip(teacher["positive"], negatives, strict=True))

    # The soup is what kalm-v2/ holds, and plain sentence-transformers loads it, bidirectional.
    model = SentenceTransformer(str(tmp_path / "kalm-v2"), device="cpu")
    assert model[0].auto_model.config.is_causal is False
    assert model.encode(["hello world"]).shape == (1, 64)


def test_quickstart_outside_a_clone_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart"]) == 2
    assert "runs from the root of a kalm-st clone" in capsys.readouterr().err


def test_quickstart_shows_no_deprecation_warning_and_no_warning_about_its_own_data(
    quickstart_run: QuickstartRun,
) -> None:
    """What was printed on every stage: transformers' gradient_checkpointing FutureWarnings (kalm-st's configs and
    model now use activation_checkpointing), mteb's renamed-method FutureWarning per eval, sentence-transformers'
    "Computing widget examples" for a card kalm-st replaces, and kalm-st's duplicate-pair warning on its own data."""
    # Python shows these by default (DeprecationWarning only from __main__, so not a user's concern here)
    shown = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in quickstart_run.warnings
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning))
    ]
    assert shown == []
    assert "Computing widget examples" not in quickstart_run.stderr
    own_warnings = [r.getMessage() for r in quickstart_run.records if r.name.startswith("kalm_st") and r.levelno >= 30]
    assert own_warnings == []


def test_quickstart_keeps_one_model_and_a_second_run_skips_every_step(quickstart_run: QuickstartRun) -> None:
    """keep_intermediate_models: false: the stage models and the converted backbone are removed once every step
    reading them is done; kalm-v2/ (the soup) is the one model left, and the manifests make a re-run skip it all."""
    work, root = quickstart_run.root / "work", quickstart_run.root
    weights = sorted(str(p.relative_to(root)) for p in root.rglob("model.safetensors"))
    assert weights == ["kalm-v2/model.safetensors"]
    for stage in ("stage1", "stage2", "stage3"):
        assert json.loads((work / stage / MANIFEST).read_text())["pruned"] is True
    # kalm-st's card, not sentence-transformers' automatic one, follows the removed stages back through their records
    card = (root / "kalm-v2" / "README.md").read_text()
    assert "sentence_transformers_model_id" not in card
    assert "### Stage 1: pretrain" in card and "### Stage 3: distill" in card
    # a card built later (kalm-st push) still finds every stage, from the records beside the removed final/ folders
    stages = [config.get("stage") for config in find_training_configs(root / "kalm-v2")]
    assert sorted(stages) == ["distill", "finetune", "pretrain", "soup"]

    stdout = io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        with redirect_stdout(stdout):
            assert main(_quickstart_argv(root)) == 0
    finally:
        os.chdir(cwd)
    statuses = dict(line.split("\t")[:2] for line in stdout.getvalue().splitlines() if "\t" in line)
    assert set(statuses.values()) == {"skipped"} and len(statuses) == 12
