"""Report of the ablation: docs/ablation.md and docs/ablation.png from the stored results."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import CHART_PATH, CONFIG_DIR, DOC_PATH, STUDENT_TITLES, STUDENTS, TASKS, config_diff, load_common

# ----------------------------------------------------------------------------------------------------------------
# Report.


def read_results(work_dir: Path, mode: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """student -> row label (arm, ``start``, ``teacher``, soup) -> the runs (one per seed)."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((work_dir / "results" / mode).glob("*/*.json")):
        run = json.loads(path.read_text(encoding="utf8"))
        results[run["student"]][run.get("arm") or run["label"]].append(run)
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


ROW_TITLES: dict[str, str] = {
    "teacher": "teacher: all-mpnet-base-v2 (reference)",
    "start": "starting model (reference)",
    "arm1_infonce": "1 InfoNCE (in-batch + hard negatives)",
    "arm2_focal": "2 + focal",
    "arm3_focal_mixing": "3 + focal + mixing",
    "arm4_focal_mixing_distill": "4 + focal + mixing + distillation",
    "arm5_soup_arm3": "5a soup of arm-3 seeds",
    "arm5_soup_arm4": "5b soup of arm-4 seeds",
}


def results_table(rows: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown rows: mean ± std over seeds per task; ``mean`` is over the tasks this student was evaluated on."""
    evaluated = [t for t in TASKS if any(t in r["scores"] for runs in rows.values() for r in runs)]
    header = "| arm | n | " + " | ".join(TASKS) + " | mean | train s/run | eval s/run |"
    lines = [header, "|" + "---|" * (len(TASKS) + 5)]
    for key, title in ROW_TITLES.items():
        runs = rows.get(key, [])
        if not runs:
            continue
        cells = [_cell([r["scores"][t] for r in runs if t in r["scores"]]) for t in TASKS]
        means = [
            statistics.fmean(r["scores"][t] for t in evaluated) for r in runs if set(evaluated) <= set(r["scores"])
        ]
        train_s = [r["train_seconds"] for r in runs if "train_seconds" in r]
        n = (
            len(runs)
            if "seed" in runs[0] and runs[0]["seed"] is not None
            else len(runs[0].get("ingredients", [])) or 1
        )
        eval_s = [r["eval_seconds"] for r in runs if "eval_seconds" in r]
        seconds = f"{statistics.fmean(train_s):.0f}" if train_s else "–"
        seconds += f" | {statistics.fmean(eval_s):.0f}" if eval_s else " | –"
        lines.append(f"| {title} | {n} | " + " | ".join(cells) + f" | {_cell(means)} | {seconds} |")
    return lines


def chart(all_results: Mapping[str, Mapping[str, Mapping[str, list[dict[str, Any]]]]], path: Path) -> None:
    """One panel per (mode, student): each arm's score minus arm 1's (the InfoNCE baseline), per task and mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (mode, student)
        for mode in ("full", "quick")
        for student in STUDENTS
        if all_results[mode].get(student, {}).get("arm1_infonce")
    ]
    if not panels:
        return
    columns = [*TASKS, "mean"]

    def values(runs: list[dict[str, Any]], column: str) -> list[float]:
        if column == "mean":
            return [statistics.fmean(r["scores"].values()) for r in runs if r["scores"]]
        return [r["scores"][column] for r in runs if column in r["scores"]]

    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.4 * len(panels) + 0.8), squeeze=False)
    compared = [k for k in ROW_TITLES if k.startswith("arm") and k != "arm1_infonce"]
    for ax, (mode, student) in zip(axes[:, 0], panels, strict=True):
        rows = all_results[mode][student]
        baseline = {c: statistics.fmean(values(rows["arm1_infonce"], c) or [math.nan]) for c in columns}
        columns_here = [c for c in columns if not math.isnan(baseline[c])]
        present = [k for k in compared if rows.get(k)]
        width = 0.8 / max(1, len(present))
        for index, key in enumerate(present):
            means, errs = [], []
            for column in columns_here:
                vals = values(rows[key], column)
                mean, std = _mean_std(vals) if vals else (math.nan, None)
                means.append(mean - baseline[column])
                errs.append(std or 0.0)
            xs = [c + (index - (len(present) - 1) / 2) * width for c in range(len(columns_here))]
            ax.bar(xs, means, width, yerr=errs, label=ROW_TITLES[key], capsize=2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(columns_here)), [f"{c}\n(arm 1: {baseline[c]:.1f})" for c in columns_here], fontsize=8)
        ax.set_ylabel("score - arm 1 (x100)")
        n_seeds = len(rows["arm1_infonce"])
        ax.set_title(f"{STUDENT_TITLES[student]}, {mode} mode ({n_seeds} seed(s); error bar = std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hardware() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} x {cpu}, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def write_report(work_dir: Path, doc_path: Path = DOC_PATH, chart_path: Path = CHART_PATH) -> Path:
    """docs/ablation.md from the stored results of every mode, plus benchmarks/ablation/reading.md (hand-written)."""
    all_results = {mode: read_results(work_dir, mode) for mode in ("quick", "full")}
    runs_meta = {mode: _read_meta(work_dir, mode) for mode in ("quick", "full")}
    common = load_common()
    out = [
        "# Ablation: what each KaLM-V2 technique is worth at small scale",
        "",
        "Generated by `benchmarks/ablation.py --report` from the stored run results; the reading at the end is "
        "hand-written (`benchmarks/ablation/reading.md`). Scores are mteb main scores x100 on the offline tasks of "
        "`kalm_st.evaluation` (STSBenchmark / SICK-R: Spearman; Banking77: accuracy; TrecQAReranking: MAP@1000; "
        "TrecQARetrieval: nDCG@10). Mean ± sample std over seeds; `n` = seeds (soups: ingredients).",
        "",
    ]
    verification = work_dir / "results" / "teacher_verification.json"
    if verification.is_file():
        v = json.loads(verification.read_text())
        out += [
            f"**Teacher check:** all-mpnet-base-v2 reassembled from the PyPI parts scores "
            f"{v['scores']['STSBenchmark']:.2f} on the full STSBenchmark test set (published {v['published']:.2f}) "
            f"in {v['eval_seconds']:.0f} s: {'reproduced' if v['reproduced'] else 'NOT reproduced'}.",
            "",
        ]
    for mode in ("full", "quick"):
        metas = runs_meta[mode]
        if not all_results[mode]:
            out += [f"## {mode} mode", "", "Not run (no results stored).", ""]
            continue
        cfg = common.modes[mode]
        out += [f"## {mode} mode", ""]
        for meta in metas:
            out += [
                f"- `{meta['command'].split(' --note ')[0]}`: {meta['wall_seconds'] / 60:.1f} min wall"
                + (f" ({meta['note']})" if meta.get("note") else "")
                + f"; load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}",
            ]
        if metas:
            out += [f"- Hardware: {metas[0]['hardware']}", ""]
        for student in STUDENTS:
            rows = all_results[mode].get(student)
            if not rows:
                continue
            spec = cfg.eval[student]
            subsample = (
                "full tasks"
                if spec.is_full()
                else "subsampled evaluation: "
                + ", ".join(
                    f"{f.name}={getattr(spec, f.name)}"
                    for f in dataclasses.fields(spec)
                    if getattr(spec, f.name) is not None
                )
                + " (fixed seed; same rows for every arm; not comparable with published scores)"
            )
            out += [
                f"### {STUDENT_TITLES[student]}",
                "",
                f"{cfg.max_steps[student]} steps x batch {cfg.batch_size[student]} per arm, seeds {list(cfg.seeds)} "
                f"(soups over seeds {list(cfg.soup_seeds)}); {subsample}.",
                "",
                *results_table(rows),
                "",
            ]
    out += selection_section(work_dir)
    out += ["## Published scores (context, full tasks; from shared/data/SOURCES.md)", ""]
    from kalm_st.evaluation import PUBLISHED_SCORES

    published_tasks = ("STSBenchmark", "SICK-R", "Banking77Classification")
    out += ["| model | " + " | ".join(published_tasks) + " |", "|---|---|---|---|"]
    for model, scores in PUBLISHED_SCORES.items():
        out.append(f"| {model} | " + " | ".join(f"{100 * scores[t]:.2f}" for t in published_tasks) + " |")
    out += ["", "![ablation chart](ablation.png)", ""]
    out += [
        "## Arms differ only in their switch",
        "",
        "Everything else (data, steps, batches, learning rate, temperature, seeds, evaluation) comes from the one "
        "`benchmarks/ablation/common.yaml`; `tests/test_ablation.py` checks that each arm changes exactly the key it "
        "names. The diff of consecutive arm configs:",
        "",
        "```diff",
        *config_diff(),
        "```",
        "",
    ]
    reading = CONFIG_DIR / "reading.md"
    if reading.is_file():
        out += [reading.read_text(encoding="utf8").rstrip(), ""]
    chart(all_results, chart_path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(out), encoding="utf8")
    return doc_path


def selection_section(work_dir: Path) -> list[str]:
    """The ``--select`` runs: arm 1 per candidate temperature, scored on STS-B dev and TrecQA dev only."""
    out = ["## Hyperparameter selection (dev sets only)", ""]
    runs = sorted((work_dir / "results" / "select").glob("*/tau*.json"))
    if not runs:
        return [*out, "Not run (no results stored).", ""]
    out += [
        "`python benchmarks/ablation.py --select --students minilm --temperatures 0.02 0.05 0.1`: arm 1 trained "
        "once per candidate temperature (seed 0), scored on the whole STS-B dev split and TrecQA dev split; no test "
        "split is read. The temperature with the best mean is the `loss.temperature` of `common.yaml`.",
        "",
        "| student | temperature | steps x batch | STS-B dev | TrecQA dev (MAP) | mean | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in runs:
        run = json.loads(path.read_text(encoding="utf8"))
        scores = run["scores"]
        shape = f"{run['max_steps']} x {run['batch_size']}" if "max_steps" in run else f"{run['mode']} mode"
        out.append(
            f"| {path.parent.name} | {run['temperature']} | {shape} | {scores['STSBenchmark']:.2f} | "
            f"{scores['TrecQAReranking']:.2f} | {statistics.fmean(scores.values()):.2f} | {run['train_seconds']:.0f} |"
        )
    return [*out, ""]


def _read_meta(work_dir: Path, mode: str) -> list[dict[str, Any]]:
    """Every invocation of ``mode`` (one file per student selection; resumed runs nest their predecessors)."""
    metas = []
    for path in sorted((work_dir / "results").glob(f"{mode}_meta*.json")):
        meta: dict[str, Any] | None = json.loads(path.read_text())
        while meta is not None:
            metas.append(meta)
            meta = meta.get("previous")
    return metas
