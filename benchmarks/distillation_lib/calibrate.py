"""``benchmarks/distillation.py --calibrate``: per-step training time and encoding speed on this CPU, and the wall
time of both parts that they predict for the sizes in ``common.yaml``.

Short by design (about two minutes): the training steps run on a small real sample of the training data (64 rows per
task, built under the calibration folder) at each part's batch size and sequence length, with arm 4's loss (the
costliest: in-batch KD and the projection; its ridge start is left out and costed from the encoding speed). Encoding
speed is measured on STS-B test texts; evaluation time is predicted from the number of texts each scored task
encodes (other tasks' texts are longer, so the prediction is a lower bound for TrecQA).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ablation_lib.assets import load_student, load_teacher
from ablation_lib.config import ArmConfig, CommonConfig, EvalSubsample
from ablation_lib.data import _source_dir, build_training_data
from ablation_lib.runs import _scratch, train
from transformers import TrainerCallback

from . import ARM_NAMES, PARTS

MEASURED_STEPS = {"minilm": 5, "smollm2": 3}
"""Timed steps after one warm-up step."""


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (TrainerCallback signature)
        self.times.append(time.perf_counter())


def texts_per_eval(spec: EvalSubsample) -> dict[str, int]:
    """How many texts each scored task encodes (mteb encodes every text of a task, duplicates included)."""
    with (_source_dir("STSBenchmark") / "test.csv").open(encoding="utf8") as handle:
        stsb = sum(1 for _ in handle)
    with (_source_dir("TrecQAReranking") / "test.csv").open(encoding="utf8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    questions = sorted({r["qtext"] for r in rows})
    kept = questions[: spec.trecqa_questions] if spec.trecqa_questions else questions
    answers = [r["atext"] for r in rows if r["qtext"] in set(kept)]
    sick = spec.sick_pairs or 9927
    bank_test = spec.banking77_test or 3080
    bank_train = min(10003, (spec.banking77_experiments or 10) * 77 * (spec.banking77_samples_per_label or 8))
    counts = {
        "STSBenchmark": 2 * (spec.stsb_pairs or stsb),
        "SICK-R": 2 * sick,
        "Banking77Classification": bank_test + bank_train,
        "TrecQAReranking": len(kept) + len(answers),
        "TrecQARetrieval": len(kept) + len(set(answers)),
    }
    return {task: n for task, n in counts.items() if spec.tasks is None or task in spec.tasks}


def _encode_speed(model: Any, texts: list[str]) -> float:
    model.encode(texts[:16], batch_size=64)  # warm-up
    start = time.perf_counter()
    model.encode(texts, batch_size=64)
    return len(texts) / (time.perf_counter() - start)


def calibrate(common: CommonConfig, arms: dict[str, ArmConfig], work_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Measure and predict; the numbers the module docstring of ``benchmarks/distillation.py`` quotes."""
    from kalm_st.precision import cpu_isa

    sample = dataclasses.replace(common, stsb_pairs=64, trecqa_rows=64, banking77_rows=400, mining_range=(8, 40))
    data = build_training_data(sample, work_dir, cache_dir, teacher_labels="embeddings")
    arm = arms[ARM_NAMES[-1]]
    arm = dataclasses.replace(arm, embedding_distillation={**arm.embedding_distillation, "projection_init": None})
    with (_source_dir("STSBenchmark") / "test.csv").open(encoding="utf8", newline="") as handle:
        texts = [text for row in list(csv.reader(handle))[:128] for text in row[:2]]
    out: dict[str, Any] = {"cpu_isa": cpu_isa(), "load_start": os.getloadavg(), "parts": {}}
    speeds = {"teacher": _encode_speed(load_teacher(cache_dir), texts)}
    for part, student in PARTS.items():
        mode = common.modes[part]
        steps = MEASURED_STEPS[student]
        timed = dataclasses.replace(mode, max_steps={student: 1 + steps})
        model = load_student(student, common, cache_dir)
        speeds[student] = _encode_speed(model, texts if student == "minilm" else texts[:128])
        timer = StepTimer()
        with _scratch() as scratch:
            train(model, data, arm, student, timed, common, 0, scratch, callbacks=[timer])
        step = statistics.median(b - a for a, b in zip(timer.times, timer.times[1:], strict=False))
        counts = texts_per_eval(mode.eval[student])
        eval_s = sum(counts.values()) / speeds[student]
        teacher_eval_s = sum(counts.values()) / speeds["teacher"]
        init = arms[ARM_NAMES[-1]].embedding_distillation["projection_init"]
        init_s = 3 * init["rows"] * (2 + common.num_negatives) / speeds[student]  # three tasks
        runs = len(mode.seeds) * (len(ARM_NAMES) if part == "a" else 2)
        train_s = mode.max_steps[student] * step
        predicted = runs * (train_s + eval_s) + eval_s + (teacher_eval_s if part == "a" else 0.0) + init_s
        out["parts"][part] = {
            "student": student,
            "batch_size": mode.batch_size[student],
            "max_steps": mode.max_steps[student],
            "step_seconds": step,
            "eval_texts": counts,
            "eval_seconds": eval_s,
            "teacher_eval_seconds": teacher_eval_s,
            "projection_init_seconds": init_s,
            "runs": runs,
            "predicted_seconds_without_data": predicted,
            "predicted_minutes_without_data": predicted / 60,
        }
    out["encode_texts_per_second"] = speeds
    out["load_end"] = os.getloadavg()
    return out
