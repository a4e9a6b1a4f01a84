"""``docs/distillation.md`` from the stored results of ``benchmarks/distillation.py`` (tables, goals, runs).

The hand-written part (design, hyperparameters, reading) is ``benchmarks/distillation/design.md``; this module adds the
numbers, and "not yet run" where there are none.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ablation_lib.config import STUDENT_TITLES, TASKS, config_diff, load_common
from ablation_lib.report import _cell, _mean_std

from . import ARM_NAMES, CONFIG_DIR, PARTS

ROW_TITLES: dict[str, str] = {
    "teacher": "teacher: all-mpnet-base-v2 (reference)",
    "start": "starting model (reference)",
    "arm1_infonce": "1 InfoNCE (in-batch + hard negatives)",
    "arm2_paper_kd": "2 focal + mixing + the paper's distillation",
    "arm3_inbatch_kd": "3 + in-batch distillation",
    "arm4_embedding_kd": "4 + embedding distillation",
}
PUBLISHED_SICK = {"start": 77.58, "teacher": 80.59}
"""SICK-R, published (the issue's goal): all-MiniLM-L6-v2 and all-mpnet-base-v2 (kalm_st.evaluation.PUBLISHED_SCORES)."""
SMOLLM2_STSB_GOAL = 75.0
NOT_RUN = "Not yet run (no results stored)."


def read_part(work_dir: Path, part: str) -> dict[str, list[dict[str, Any]]]:
    """Row label (``start``, ``teacher``, an arm) -> its runs of ``part``, one per seed."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((work_dir / "results" / part / PARTS[part]).glob("*.json")):
        run = json.loads(path.read_text(encoding="utf8"))
        rows.setdefault(run.get("arm") or run["label"], []).append(run)
    return rows


def _tasks(rows: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    return [t for t in TASKS if any(t in r["scores"] for runs in rows.values() for r in runs)]


def _means(runs: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[float]:
    """Each run's mean over ``tasks`` (runs missing one are left out)."""
    return [statistics.fmean(r["scores"][t] for t in tasks) for r in runs if set(tasks) <= set(r["scores"])]


def results_table(rows: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Mean ± sample std over seeds per task and of the per-run task mean."""
    tasks = _tasks(rows)
    header = (
        "| row | n | " + " | ".join(tasks) + (" | mean" if len(tasks) > 1 else "") + " | train s/run | eval s/run |"
    )
    lines = [header, "|" + "---|" * (len(tasks) + (5 if len(tasks) > 1 else 4))]
    for key, title in ROW_TITLES.items():
        runs = rows.get(key, [])
        if not runs:
            continue
        cells = [_cell([r["scores"][t] for r in runs if t in r["scores"]]) for t in tasks]
        if len(tasks) > 1:
            cells.append(_cell(_means(runs, tasks)))
        train_s = [r["train_seconds"] for r in runs if "train_seconds" in r]
        eval_s = [r["eval_seconds"] for r in runs if "eval_seconds" in r and not r.get("reused_from")]
        seconds = (f"{statistics.fmean(train_s):.0f}" if train_s else "–") + " | "
        seconds += (
            f"{statistics.fmean(eval_s):.0f}" if eval_s else ("(part a's)" if runs[0].get("reused_from") else "–")
        )
        lines.append(f"| {title} | {len(runs)} | " + " | ".join(cells) + f" | {seconds} |")
    return lines


def _welch_t(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return (statistics.fmean(a) - statistics.fmean(b)) / se if se > 0 else math.inf


def part_a_goals(rows: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Each distillation arm against arm 1 (the 2-std rule on the task mean) and its share of the SICK-R gap."""
    tasks = _tasks(rows)
    base = _means(rows.get("arm1_infonce", []), tasks)
    if not base:
        return [NOT_RUN]
    start = [r["scores"].get("SICK-R") for r in rows.get("start", [])]
    teacher = [r["scores"].get("SICK-R") for r in rows.get("teacher", [])]
    out = [
        "Goal 1: the best arm beats arm 1 by more than 2 standard deviations on the task mean (we require the gain "
        "to exceed twice the larger of the two arms' seed std; Welch's t alongside). Goal 2: it closes at least half "
        "of the student-teacher gap on SICK-R, measured on the same SICK-R rows (start and teacher rows above).",
        "",
        "| arm | mean - arm 1 | 2 x max std | > 2 std? | Welch t | SICK-R - start | share of the SICK-R gap |",
        "|---|---|---|---|---|---|---|",
    ]
    best, best_mean = None, -math.inf
    for arm in ARM_NAMES[1:]:
        mine = _means(rows.get(arm, []), tasks)
        if not mine:
            continue
        gain = statistics.fmean(mine) - statistics.fmean(base)
        stds = [_mean_std(v)[1] for v in (mine, base)]
        bar = 2 * max((s for s in stds if s is not None), default=math.nan)
        welch = _welch_t(mine, base)
        sick = [r["scores"]["SICK-R"] for r in rows[arm] if "SICK-R" in r["scores"]]
        share, lift = "–", "–"
        if sick and start and teacher and start[0] is not None and teacher[0] is not None:
            lift_value = statistics.fmean(sick) - start[0]
            lift = f"{lift_value:+.2f}"
            gap = teacher[0] - start[0]
            share = f"{lift_value / gap:.0%} of {gap:.2f}" if gap > 0 else f"no gap ({gap:+.2f})"
        verdict = "–" if math.isnan(bar) else ("yes" if gain > bar else "no")
        t_text = "–" if welch is None else f"{welch:.1f}"
        bar_text = "–" if math.isnan(bar) else f"{bar:.2f}"
        out.append(f"| {ROW_TITLES[arm]} | {gain:+.2f} | {bar_text} | {verdict} | {t_text} | {lift} | {share} |")
        if statistics.fmean(mine) > best_mean:
            best, best_mean = arm, statistics.fmean(mine)
    if best is not None:
        out += ["", f"Best arm by mean: **{ROW_TITLES[best]}**."]
    out += [
        "",
        f"Published SICK-R (whole task, for context): all-MiniLM-L6-v2 {PUBLISHED_SICK['start']}, all-mpnet-base-v2 "
        f"{PUBLISHED_SICK['teacher']}: a gap of {PUBLISHED_SICK['teacher'] - PUBLISHED_SICK['start']:.2f}.",
    ]
    return out


def part_b_goal(rows: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    arms = [a for a in ARM_NAMES if rows.get(a)]
    if not arms:
        return [NOT_RUN]
    out = []
    for arm in arms:
        score = statistics.fmean(r["scores"]["STSBenchmark"] for r in rows[arm])
        verdict = "reached" if score >= SMOLLM2_STSB_GOAL else "missed"
        out.append(f"- {ROW_TITLES[arm]}: STS-B {score:.2f} (goal >= {SMOLLM2_STSB_GOAL:.0f}: {verdict})")
    return out


def _read_meta(work_dir: Path, part: str) -> list[dict[str, Any]]:
    path = work_dir / "results" / f"{part}_meta.json"
    metas: list[dict[str, Any]] = []
    meta = json.loads(path.read_text(encoding="utf8")) if path.is_file() else None
    while meta is not None:
        metas.append(meta)
        meta = meta.get("previous")
    return metas[::-1]


def _evaluation(spec: Any) -> str:
    """Which rows each task is scored on, in words."""
    tasks = spec.tasks or TASKS
    parts = []
    if "STSBenchmark" in tasks:
        parts.append("STS-B: whole test" if spec.stsb_pairs is None else f"STS-B: {spec.stsb_pairs} test pairs")
    if "SICK-R" in tasks:
        parts.append("SICK-R: whole" if spec.sick_pairs is None else f"SICK-R: {spec.sick_pairs} pairs")
    if "Banking77Classification" in tasks:
        test = "whole test" if spec.banking77_test is None else f"{spec.banking77_test} test texts"
        experiments = spec.banking77_experiments or 10
        per_label = spec.banking77_samples_per_label or 8
        parts.append(f"Banking77: {test}, {experiments} experiment(s) of {per_label} training texts per intent")
    if {"TrecQAReranking", "TrecQARetrieval"} & set(tasks):
        questions = "whole test" if spec.trecqa_questions is None else f"{spec.trecqa_questions} test questions"
        parts.append(f"TrecQA (reranking and retrieval): {questions}")
    return "; ".join(parts)


def _settings(common: Any, part: str) -> str:
    mode, student = common.modes[part], PARTS[part]
    return (
        f"{STUDENT_TITLES[student]}: {mode.max_steps[student]} steps x batch {mode.batch_size[student]} per run, "
        f"seeds {list(mode.seeds)}, fp32. Evaluation: {_evaluation(mode.eval[student])} (subsets drawn once with a "
        "fixed seed: the same rows for every row of the table)."
    )


def write_report(work_dir: Path, doc_path: Path, smoke: bool = False) -> Path:
    common = load_common(CONFIG_DIR / ("smoke.yaml" if smoke else "common.yaml"))
    out = [
        "# Distillation that pays at small compute: embedding-level and in-batch distillation against InfoNCE",
        "",
        "Generated by `python benchmarks/distillation.py --report` from the stored results; the design, the "
        "hyperparameters and the reading are hand-written (`benchmarks/distillation/design.md`). Scores are mteb main "
        "scores x100 on the offline tasks of `kalm_st.evaluation` (STS-B / SICK-R: Spearman; Banking77: accuracy; "
        "TrecQAReranking: MAP@1000; TrecQARetrieval: nDCG@10). Mean ± sample std over seeds; `n` = runs.",
        "",
    ]
    if smoke:
        out += ["**Smoke run: tiny subsets, a few steps. The numbers only show that the wiring works.**", ""]
    titles = {"a": "Part a: the power test (all-MiniLM-L6-v2)", "b": "Part b: the decoder (SmolLM2-135M)"}
    for part in PARTS:
        rows = read_part(work_dir, part)
        out += [f"## {titles[part]}", "", _settings(common, part), ""]
        if not rows:
            out += [NOT_RUN, ""]
            continue
        out += [*results_table(rows), ""]
        out += ["### Goals", "", *(part_a_goals(rows) if part == "a" else part_b_goal(rows)), ""]
    out += ["## Runs", ""]
    for part in PARTS:
        metas = _read_meta(work_dir, part)
        if not metas:
            out.append(f"- part {part}: {NOT_RUN}")
        for meta in metas:
            emulation = " ".join(f"{k}={v}" for k, v in meta.get("emulation", {}).items()) or "none"
            out.append(
                f"- part {part}: `{meta['command']}` (arms {', '.join(meta['arms'])}): "
                f"{meta['wall_seconds'] / 60:.1f} min wall (+ {meta['data_seconds'] / 60:.1f} min building the data "
                f"and teacher embeddings); CPU: {meta['hardware']}; vector ISA {meta['cpu_isa']} "
                f"(emulation: {emulation}); load average at start {meta['load_start']}, at end {meta['load_end']}"
                + (f"; {meta['note']}" if meta.get("note") else "")
            )
    out += ["", "## Published scores (whole tasks, context)", ""]
    from kalm_st.evaluation import PUBLISHED_SCORES

    published = ("STSBenchmark", "SICK-R", "Banking77Classification")
    out += ["| model | " + " | ".join(published) + " |", "|---|---|---|---|"]
    for model, scores in PUBLISHED_SCORES.items():
        if model.startswith(("all-MiniLM", "all-mpnet")):
            out.append(f"| {model} | " + " | ".join(f"{100 * scores[t]:.2f}" for t in published) + " |")
    out += ["", "## Arm configs (each file against its base)", "", "```diff", *config_diff(CONFIG_DIR, ARM_NAMES)]
    out += ["```", ""]
    design = CONFIG_DIR / "design.md"
    if design.is_file():
        out += [design.read_text(encoding="utf8").rstrip(), ""]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(out), encoding="utf8")
    return doc_path
