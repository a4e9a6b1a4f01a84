"""Reports from an evaluation folder: a markdown table of main scores, a bar chart, and Matryoshka curves.

Scores are read back from mteb's result files (``mteb.results.TaskResult``) and shown x100 like the leaderboard.
The published scores of reference models (``shared/data/SOURCES.md``) are added as context rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kalm_st.io import write_text_atomic

Scores = Mapping[str, Mapping[str, float]]
"""Model (row) -> task (column) -> main score in mteb's 0-1 scale."""

PUBLISHED_SCORES: dict[str, dict[str, float]] = {
    "all-MiniLM-L6-v2 (published)": {"STSBenchmark": 0.8203, "SICK-R": 0.7758, "Banking77Classification": 0.8004},
    "all-mpnet-base-v2 (published)": {"STSBenchmark": 0.8342, "SICK-R": 0.8059, "Banking77Classification": 0.8170},
    "KaLM-V2 mini-instruct (published)": {
        "STSBenchmark": 0.8507,
        "SICK-R": 0.7985,
        "Banking77Classification": 0.8948,
    },
    "KaLM-V2.5 mini-instruct (published)": {
        "STSBenchmark": 0.8888,
        "SICK-R": 0.8320,
        "Banking77Classification": 0.9031,
    },
    "Qwen3-Embedding-0.6B (published)": {
        "STSBenchmark": 0.9113,
        "SICK-R": 0.8483,
        "Banking77Classification": 0.8101,
    },
}
"""MTEB main scores from embeddings-benchmark/results, as listed in shared/data/SOURCES.md."""

EXPERIMENT_DIR = "experiments"


def read_scores(output_dir: str | os.PathLike[str], include_experiments: bool = True) -> dict[str, dict[str, float]]:
    """Main scores of every model (and experiment) under an evaluation folder: ``{label: {task: score}}``.

    The label is ``org/name`` (plus ``@revision`` when a model has several, and `` [experiment]`` for experiments).
    """
    from mteb.results import TaskResult

    root = Path(output_dir) / "results"
    found: dict[tuple[str, str, str], dict[str, float]] = {}
    for path in sorted(root.glob("*/*/**/*.json")):
        if path.name == "model_meta.json":
            continue
        relative = path.relative_to(root).parts
        model, revision, rest = relative[0], relative[1], relative[2:-1]
        experiment = rest[1] if len(rest) == 2 and rest[0] == EXPERIMENT_DIR else ""
        if rest and not experiment:
            continue
        if experiment and not include_experiments:
            continue
        result = TaskResult.from_disk(path)
        found.setdefault((model.replace("__", "/", 1), revision, experiment), {})[result.task_name] = float(
            result.get_score()
        )
    revisions: dict[str, set[str]] = {}
    for model, revision, _ in found:
        revisions.setdefault(model, set()).add(revision)
    scores: dict[str, dict[str, float]] = {}
    for (model, revision, experiment), task_scores in found.items():
        label = (
            model + (f"@{revision}" if len(revisions[model]) > 1 else "") + (f" [{experiment}]" if experiment else "")
        )
        scores[label] = task_scores
    return scores


def markdown_table(
    scores: Scores,
    tasks: Sequence[str] | None = None,
    *,
    published: Mapping[str, Mapping[str, float]] | None = PUBLISHED_SCORES,
    average: bool = True,
) -> str:
    """A markdown table: one row per model, one column per task (x100, 2 decimals), ``-`` where missing.

    ``published`` rows (reference models' leaderboard scores) are appended for the tasks of the table; an average
    column is added when asked and every row has all tasks.
    """
    if tasks is None:
        tasks = sorted({task for row in scores.values() for task in row})
    rows: dict[str, Mapping[str, float]] = dict(scores)
    for label, row in (published or {}).items():
        if any(task in row for task in tasks):
            rows[label] = row
    header = ["model", *tasks] + (["average"] if average and len(tasks) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, row in rows.items():
        cells = [_fmt(row.get(task)) for task in tasks]
        if len(header) > len(tasks) + 1:
            values = [row.get(task) for task in tasks]
            cells.append(_fmt(sum(values) / len(values)) if all(v is not None for v in values) else "-")
        lines.append("| " + " | ".join([label.replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def bar_chart(
    scores: Scores,
    path: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
    *,
    published: Mapping[str, Mapping[str, float]] | None = PUBLISHED_SCORES,
    title: str = "MTEB main scores",
) -> Path:
    """A grouped bar chart (tasks on the x axis, one bar per model) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if tasks is None:
        tasks = sorted({task for row in scores.values() for task in row})
    rows: dict[str, Mapping[str, float]] = dict(scores)
    for label, row in (published or {}).items():
        if any(task in row for task in tasks):
            rows[label] = row
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 2), 4.5))
    for index, (label, row) in enumerate(rows.items()):
        xs = [t + (index - (len(rows) - 1) / 2) * width for t in range(len(tasks))]
        ys = [100 * row.get(task, math.nan) for task in tasks]
        ax.bar(xs, ys, width=width, label=label, hatch="//" if label.endswith("(published)") else None)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("main score (x100)")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def matryoshka_curves(
    curves: Mapping[str, Mapping[int, Mapping[str, float]]],
    path: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
    title: str = "Matryoshka: score vs. embedding dimension",
) -> Path:
    """Score versus ``truncate_dim``, one line per (model, task), log-scaled x axis, saved as PNG.

    ``curves``: model -> dim -> task -> score (see :func:`read_matryoshka_scores`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, by_dim in curves.items():
        dims = sorted(by_dim)
        names = tasks or sorted({task for row in by_dim.values() for task in row})
        for task in names:
            ax.plot(dims, [100 * by_dim[d].get(task, math.nan) for d in dims], marker="o", label=f"{model}: {task}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension (truncate_dim)")
    ax.set_ylabel("main score (x100)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def read_matryoshka_scores(
    scores: Scores, full_dims: Mapping[str, int] | None = None
) -> dict[str, dict[int, dict[str, float]]]:
    """Regroup :func:`read_scores` output (``"name [truncate_dim_256]"`` labels) into model -> dim -> task -> score.

    The untruncated run counts as the model's full dimension when ``full_dims`` gives it.
    """
    curves: dict[str, dict[int, dict[str, float]]] = {}
    for label, row in scores.items():
        model, _, experiment = label.partition(" [")
        experiment = experiment.rstrip("]")
        if experiment.startswith("truncate_dim_") and experiment[len("truncate_dim_") :].isdigit():
            curves.setdefault(model, {})[int(experiment[len("truncate_dim_") :])] = dict(row)
        elif not experiment and full_dims and model in full_dims:
            curves.setdefault(model, {})[full_dims[model]] = dict(row)
    return curves


def write_report(
    output_dir: str | os.PathLike[str],
    destination: str | os.PathLike[str] | None = None,
    tasks: Iterable[str] | None = None,
    full_dims: Mapping[str, int] | None = None,
) -> dict[str, Path]:
    """``report.md`` + ``scores.png`` (and ``matryoshka.png`` when truncated runs exist) for an evaluation folder.

    Without matplotlib (the ``plot`` extra) only ``report.md`` is written, and it links no image.
    """
    import importlib.util

    plots = importlib.util.find_spec("matplotlib") is not None
    destination = Path(destination or output_dir)
    destination.mkdir(parents=True, exist_ok=True)
    all_scores = read_scores(output_dir)
    main = {label: row for label, row in all_scores.items() if " [" not in label}
    task_list = list(tasks) if tasks is not None else None
    files = {"report": destination / "report.md"}
    table = markdown_table(main or all_scores, task_list)
    text = "# MTEB results\n\nMain scores x100 (mteb's main metric per task).\n\n" + table
    if len(main) != len(all_scores):
        experiments = {label: row for label, row in all_scores.items() if " [" in label}
        text += "\n## Experiments\n\n" + markdown_table(experiments, task_list, published=None)
    curves = read_matryoshka_scores(all_scores, full_dims)
    if plots and any(len(by_dim) > 1 for by_dim in curves.values()):
        files["matryoshka"] = matryoshka_curves(curves, destination / "matryoshka.png", task_list)
        text += "\n![Matryoshka curves](matryoshka.png)\n"
    if plots:
        files["chart"] = bar_chart(main or all_scores, destination / "scores.png", task_list)
        text += "\n![Main scores](scores.png)\n"
    write_text_atomic(files["report"], text)
    return files


def _save(fig: object, path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return target


__all__ = [
    "PUBLISHED_SCORES",
    "Scores",
    "bar_chart",
    "markdown_table",
    "matryoshka_curves",
    "read_matryoshka_scores",
    "read_scores",
    "write_report",
]
