"""Runs of the ablation: losses, training, evaluation, and the orchestration of every (student, arm, seed)."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kalm_st.io import write_text_atomic
from kalm_st.precision import use_bf16

from .assets import load_student, load_teacher
from .config import (
    DEV_TASKS,
    MPNET_PUBLISHED_STSB,
    NO_IN_BATCH_TASKS,
    SOUP_OF,
    TASKS,
    TRAIN_TASK_TYPES,
    ArmConfig,
    CommonConfig,
    EvalSubsample,
    ModeConfig,
)
from .data import build_training_data, eval_data_dir

if TYPE_CHECKING:
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformer
    from torch import nn

logger = logging.getLogger("ablation")


# ----------------------------------------------------------------------------------------------------------------
# Losses and training.


EMBEDDING_ONLY_KEYS: tuple[str, ...] = ("projection_init", "projection_learning_rate")
"""Keys of an arm's ``embedding_distillation`` that the benchmark reads (the rest go to ``EmbeddingDistillation``)."""


def build_losses(model: SentenceTransformer, arm: ArmConfig, common: CommonConfig, seed: int) -> dict[str, nn.Module]:
    """One loss per training task; arms differ only in ``gamma``, mixing, distillation and embedding distillation."""
    from kalm_st.losses import ContrastiveDistillation, EmbeddingDistillation, FocalInfoNCE, HardNegativeMixing

    losses: dict[str, nn.Module] = {}
    for task in ("STSBenchmark", "TrecQA", "Banking77Classification"):
        mixing = (
            HardNegativeMixing(**arm.hard_negative_mixing, seed=seed) if arm.hard_negative_mixing is not None else None
        )
        base = FocalInfoNCE(
            model,
            temperature=common.temperature,
            gamma=arm.gamma,
            in_batch_negatives=task not in NO_IN_BATCH_TASKS,
            hard_negative_mixing=mixing,
        )
        loss = base if arm.distillation is None else ContrastiveDistillation(model, base, **arm.distillation)
        if arm.embedding_distillation is not None:
            kwargs = {k: v for k, v in arm.embedding_distillation.items() if k not in EMBEDDING_ONLY_KEYS}
            loss = EmbeddingDistillation(model, loss, **kwargs)
        losses[task] = loss
    return losses


def train(
    model: SentenceTransformer,
    data: DatasetDict,
    arm: ArmConfig,
    student: str,
    mode: ModeConfig,
    common: CommonConfig,
    seed: int,
    scratch: Path,
    init_cache: Path | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train ``model`` in place; returns timing and the last logged losses.

    An arm with ``embedding_distillation.projection_init`` starts each task's projection at the ridge fit of
    :mod:`ablation_lib.projection` (cached per task under ``init_cache``).
    """
    import torch
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from kalm_st.data import build_training_prompts
    from kalm_st.sampling import TaskHomogeneousBatchSampler

    settings = common.students[student]
    if arm.distillation is None and arm.embedding_distillation is None:
        data = DatasetDict({task: ds.remove_columns("label") for task, ds in data.items()})
    prompts = build_training_prompts(data, TRAIN_TASK_TYPES) if settings.instructions else None
    losses = build_losses(model, arm, common, seed)
    extra: dict[str, Any] = {}
    embedding = arm.embedding_distillation or {}
    if embedding.get("projection_init"):
        from .projection import init_projection

        init = embedding["projection_init"]
        extra["projection_init"] = {
            task: init_projection(
                losses[task],
                model,
                data[task],
                (prompts or {}).get(task),
                rows=int(init["rows"]),
                ridge=float(init["ridge"]),
                seed=common.data_seed,
                cache=None
                if init_cache is None
                else init_cache / f"{task}-rows{init['rows']}-ridge{init['ridge']}.pt",
            )
            for task in data
        }
    # the projections are the losses' only parameters (named "<task>.projection.weight" in the trainer)
    lr_mapping = {}
    if embedding.get("projection_learning_rate"):
        lr_mapping = {r"\.projection\.": float(embedding["projection_learning_rate"])}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(scratch),
        max_steps=mode.max_steps[student],
        per_device_train_batch_size=mode.batch_size[student],
        learning_rate=settings.learning_rate,
        warmup_steps=common.warmup_ratio,
        weight_decay=common.weight_decay,
        bf16=use_bf16(settings.bf16, what="students.bf16"),
        learning_rate_mapping=lr_mapping,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU needs it
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, mode.max_steps[student] // 5),
        dataloader_drop_last=True,
        disable_tqdm=True,
        prompts=prompts,
        multi_dataset_batch_sampler=TaskHomogeneousBatchSampler.configure(task_names=list(data)),
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=losses, callbacks=list(callbacks) or None
    )
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"train_seconds": seconds, "train_loss": output.training_loss, "logged_losses": logged, **extra}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(
    model: SentenceTransformer,
    spec: EvalSubsample,
    data_dir: Path | None,
    output_dir: Path,
    instructions: bool,
    eval_dtype: str,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Main scores (x100) on the offline tasks via kalm_st.evaluation (mteb's evaluators)."""
    import torch

    from kalm_st.evaluation import evaluate_model, local_tasks

    task_objects = local_tasks(tasks or spec.tasks or TASKS, data_dir=data_dir)
    for task in task_objects:
        if task.metadata.name == "Banking77Classification" and spec.banking77_experiments is not None:
            task.n_experiments = spec.banking77_experiments
        if task.metadata.name == "Banking77Classification" and spec.banking77_samples_per_label is not None:
            task.samples_per_label = spec.banking77_samples_per_label
    model.eval()
    if eval_dtype == "auto":
        eval_dtype = "bfloat16" if use_bf16("auto") else "float32"
    if eval_dtype != "float32":
        model.to(getattr(torch, eval_dtype))
    start = time.perf_counter()
    run = evaluate_model(
        model,
        task_objects,
        output_dir=output_dir,
        instructions="model" if instructions else "none",
        model_name=f"ablation/{output_dir.name}",
        overwrite=True,
        batch_size=64,
    )
    return {"scores": {k: 100 * v for k, v in run.scores.items()}, "eval_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------------
# Orchestration.


@dataclasses.dataclass
class Context:
    common: CommonConfig
    arms: dict[str, ArmConfig]
    mode: ModeConfig
    work_dir: Path
    cache_dir: Path
    deadline: float

    def result_path(self, student: str, label: str) -> Path:
        return self.work_dir / "results" / self.mode.name / student / f"{label}.json"

    def model_path(self, student: str, label: str) -> Path:
        return self.work_dir / "models" / self.mode.name / student / label

    def out_of_time(self) -> bool:
        return time.time() > self.deadline


def _write_result(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


@contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kalm-ablation-") as folder:
        yield Path(folder)


def _fmt_scores(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


def run_reference(ctx: Context, student: str, label: str) -> None:
    """Evaluate the starting model (``start``) or the teacher (``teacher``) on the mode's evaluation set."""
    path = ctx.result_path(student, label)
    if path.is_file():
        return
    spec = ctx.mode.eval[student]
    settings = ctx.common.students[student]
    data_dir = eval_data_dir(spec, ctx.work_dir, f"{ctx.mode.name}-{student}")
    if label == "teacher":
        model, instructions, dtype = load_teacher(ctx.cache_dir), False, "float32"
    else:
        model, instructions, dtype = load_student(student, ctx.common, ctx.cache_dir), settings.instructions, None
    with _scratch() as scratch:
        result = evaluate(model, spec, data_dir, scratch / label, instructions, dtype or settings.eval_dtype)
    _write_result(path, {"label": label, "student": student, "seed": None, **result})
    logger.info("%s %s: %s", student, label, _fmt_scores(result["scores"]))


def run_arm(ctx: Context, data: DatasetDict, student: str, arm_name: str, seed: int, keep: bool) -> None:
    """Train one (student, arm, seed) from the starting weights and evaluate it.

    A seed that is only a soup ingredient (``soup_seeds`` minus ``seeds``) is trained and saved, not evaluated.
    """
    label = f"{arm_name}-s{seed}"
    evaluated = seed in ctx.mode.seeds
    path = ctx.result_path(student, label if evaluated else f"ingredients/{label}")
    if path.is_file() and (not keep or (ctx.model_path(student, label) / "modules.json").is_file()):
        return
    if ctx.out_of_time():
        logger.warning("Time budget spent: skipping %s %s", student, label)
        return
    import torch

    torch.manual_seed(seed)
    settings = ctx.common.students[student]
    model = load_student(student, ctx.common, ctx.cache_dir)
    spec = ctx.mode.eval[student]
    result: dict[str, Any] = {"scores": {}}
    with _scratch() as scratch:
        init_cache = ctx.work_dir / "projection_init" / student
        info = train(model, data, ctx.arms[arm_name], student, ctx.mode, ctx.common, seed, scratch, init_cache)
        if keep:
            model.save(str(ctx.model_path(student, label)))
        if evaluated:
            data_dir = eval_data_dir(spec, ctx.work_dir, f"{ctx.mode.name}-{student}")
            result = evaluate(model, spec, data_dir, scratch / label, settings.instructions, settings.eval_dtype)
    _write_result(path, {"label": label, "student": student, "arm": arm_name, "seed": seed, **info, **result})
    logger.info(
        "%s %s: %s (train %.0f s, eval %.0f s)",
        student,
        label,
        _fmt_scores(result["scores"]) or "soup ingredient, not evaluated",
        info["train_seconds"],
        result.get("eval_seconds", 0.0),
    )


def run_soup(ctx: Context, student: str, soup_name: str) -> None:
    path = ctx.result_path(student, soup_name)
    if path.is_file():
        return
    arm_name = SOUP_OF[soup_name]
    paths = [ctx.model_path(student, f"{arm_name}-s{seed}") for seed in ctx.mode.soup_seeds]
    if ctx.out_of_time():
        logger.warning("Time budget spent: skipping %s %s", student, soup_name)
        return
    missing = [str(p) for p in paths if not (p / "modules.json").is_file()]
    if missing or len(paths) < 2:
        logger.warning("Soup %s of %s: missing ingredients %s", soup_name, student, missing)
        return
    from kalm_st import load_model
    from kalm_st.recipe.soup import soup_models

    settings = ctx.common.students[student]
    start = time.perf_counter()
    model = soup_models([load_model(str(p)) for p in paths])
    soup_seconds = time.perf_counter() - start
    spec = ctx.mode.eval[student]
    data_dir = eval_data_dir(spec, ctx.work_dir, f"{ctx.mode.name}-{student}")
    with _scratch() as scratch:
        result = evaluate(model, spec, data_dir, scratch / soup_name, settings.instructions, settings.eval_dtype)
    payload = {
        "label": soup_name,
        "student": student,
        "arm": soup_name,
        "seed": None,
        "ingredients": [p.name for p in paths],
    }
    _write_result(path, {**payload, "soup_seconds": soup_seconds, **result})
    logger.info("%s %s: %s", student, soup_name, _fmt_scores(result["scores"]))


def verify_teacher(ctx: Context) -> None:
    """all-mpnet-base-v2 must reproduce its published STSBenchmark score (83.42) on the full test set."""
    path = ctx.work_dir / "results" / "teacher_verification.json"
    if path.is_file():
        return
    spec = EvalSubsample(None, None, None, None, None, None)
    with _scratch() as scratch:
        result = evaluate(
            load_teacher(ctx.cache_dir), spec, None, scratch / "teacher", False, "float32", ["STSBenchmark"]
        )
    score = result["scores"]["STSBenchmark"]
    result["published"] = MPNET_PUBLISHED_STSB
    result["reproduced"] = abs(score - MPNET_PUBLISHED_STSB) < 0.1
    _write_result(path, result)
    logger.info("Teacher STSBenchmark %.2f (published %.2f)", score, MPNET_PUBLISHED_STSB)
    if not result["reproduced"]:
        raise RuntimeError(f"all-mpnet-base-v2 scored {score:.2f} on STSBenchmark, published {MPNET_PUBLISHED_STSB}")


def run_mode(ctx: Context, students: Sequence[str], arm_names: Sequence[str], with_teacher: bool) -> None:
    data = build_training_data(ctx.common, ctx.work_dir, ctx.cache_dir)
    logger.info("Training data: %s", {task: len(ds) for task, ds in data.items()})
    verify_teacher(ctx)
    for student in students:
        run_reference(ctx, student, "start")
        if with_teacher:
            run_reference(ctx, student, "teacher")
        soup_arms = {a for a in SOUP_OF.values() if a in arm_names}
        for seed in sorted(set(ctx.mode.seeds) | set(ctx.mode.soup_seeds)):
            for arm_name in arm_names:
                if seed in ctx.mode.seeds or arm_name in soup_arms:
                    run_arm(
                        ctx, data, student, arm_name, seed, keep=arm_name in soup_arms and seed in ctx.mode.soup_seeds
                    )
        for soup_name, arm_name in SOUP_OF.items():
            if arm_name in arm_names:
                run_soup(ctx, student, soup_name)


def select_temperature(ctx: Context, student: str, candidates: Sequence[float]) -> dict[float, dict[str, float]]:
    """Arm 1 trained with each candidate temperature, scored on STS-B dev and TrecQA dev (never on test)."""
    data = build_training_data(ctx.common, ctx.work_dir, ctx.cache_dir)
    settings = ctx.common.students[student]
    spec = dataclasses.replace(ctx.mode.eval[student], stsb_pairs=None, trecqa_questions=None)
    data_dir = eval_data_dir(spec, ctx.work_dir, f"dev-{student}", dev=True)
    table: dict[float, dict[str, float]] = {}
    for temperature in candidates:
        path = ctx.work_dir / "results" / "select" / student / f"tau{temperature}.json"
        if not path.is_file():
            common = dataclasses.replace(ctx.common, temperature=temperature)
            model = load_student(student, common, ctx.cache_dir)
            with _scratch() as scratch:
                info = train(model, data, ctx.arms["arm1_infonce"], student, ctx.mode, common, 0, scratch)
                result = evaluate(
                    model, spec, data_dir, scratch / "dev", settings.instructions, settings.eval_dtype, DEV_TASKS
                )
            steps = {"max_steps": ctx.mode.max_steps[student], "batch_size": ctx.mode.batch_size[student]}
            _write_result(path, {"temperature": temperature, "mode": ctx.mode.name, **steps, **info, **result})
        table[temperature] = json.loads(path.read_text())["scores"]
        logger.info("%s tau=%s dev: %s", student, temperature, _fmt_scores(table[temperature]))
    return table
