"""Task specs: where a task's rows are and how to read them, resolved from a config's ``data.tasks`` and
``data.sources`` (files, globs, folders of shards, sub-folders, Hub datasets, a ``task`` column)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kalm_st.data.shards import HUB_PREFIX, column_tasks, has_readme_configs, is_remote_path, parse_hub_path

logger = logging.getLogger(__name__)

NO_IN_BATCH_SUFFIX = "no_in_batch_neg"


@dataclass(frozen=True)
class TaskSource:
    """One task's rows: where they are and how to read them.

    ``key`` is the config key that named it (for error messages); ``config_name`` a README ``configs:`` entry;
    ``type`` None: from the data's FlagEmbedding ``type`` column, else Retrieval.
    """

    name: str
    path: str
    key: str
    type: str | None = None
    revision: str | None = None
    config_name: str | None = None
    max_rows: int | None = None
    in_batch_negatives: bool | None = None
    instruction: str | None = None
    converted: bool = False
    """Set once loaded: the texts carry their instructions (KaLM / F2LLM rows, or an ``instruction`` column)."""

    @property
    def remote(self) -> bool:
        return is_remote_path(self.path)


def list_subtasks(path: str, revision: str | None = None) -> list[tuple[str, str, str | None]]:
    """The tasks of a folder (local or Hub): ``[(task name, path, config name)]``: one per README ``configs:`` entry
    (``datasets.get_dataset_config_names``, offline from the cache), else one per sub-folder."""
    from datasets import get_dataset_config_names

    if is_remote_path(path):
        repo, sub = parse_hub_path(path)
        if sub is None:
            try:
                names = get_dataset_config_names(repo, revision=revision)
            except Exception:  # noqa: BLE001 - no README configs: list the tree below
                names = []
            if names and names != ["default"]:
                return [(n, path, n) for n in names]
        from huggingface_hub import HfApi

        entries = HfApi().list_repo_tree(repo, path_in_repo=sub or "", repo_type="dataset", revision=revision)
        folders = sorted(e.path.rsplit("/", 1)[-1] for e in entries if type(e).__name__ == "RepoFolder")
        return [(f, f"{path.rstrip('/')}/{f}", None) for f in folders if not f.startswith(".")]
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Training data folder not found: {folder}")
    if has_readme_configs(folder):
        return [(n, path, n) for n in get_dataset_config_names(str(folder))]
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not subs:
        raise FileNotFoundError(f"{folder}: no sub-folders to expand into tasks (tasks: subfolders)")
    return [(s, str(folder / s), None) for s in subs]


def with_suffix_rule(task: TaskSource) -> TaskSource:
    """FlagEmbedding's rule: a task named ``..no_in_batch_neg`` trains without in-batch negatives."""
    if task.in_batch_negatives is None and task.name.endswith(NO_IN_BATCH_SUFFIX):
        return replace(task, in_batch_negatives=False)
    return task


def task_source(name: str, task: Any, key: str) -> TaskSource:
    """A :class:`TaskSource` from a config's ``TaskConfig``."""
    return with_suffix_rule(
        TaskSource(name, task.path, key, task.type, task.revision, None, task.max_rows, task.in_batch_negatives)
    )


def resolve_tasks(config: Any, tasks: dict[str, Any], *, with_sources: bool = True, skip_remote: bool = False):  # noqa: ANN201
    """Task name -> :class:`TaskSource`: ``tasks`` (a stage's ``TaskConfig`` entries) plus the expansion of
    ``config.data.sources``. ``skip_remote`` (``--dry-run``): a Hub source is not listed (that needs the network)."""
    section = "tasks" if tasks is config.data.tasks else "eval_tasks"
    out: dict[str, TaskSource] = {name: task_source(name, t, f"data.{section}.{name}") for name, t in tasks.items()}
    sources = config.data.sources if with_sources else ()
    return expand_sources(sources, config.source, "data.sources", skip_remote=skip_remote, defined=out)


def expand_sources(
    sources: Any, source: str, prefix: str, *, skip_remote: bool = False, defined: dict[str, TaskSource] | None = None
) -> dict[str, TaskSource]:
    """``defined`` plus the tasks of ``data.sources`` entries (or of a curation step's ``sources``)."""
    from kalm_st.recipe.config import ConfigError

    out = dict(defined or {})
    for i, entry in enumerate(sources):
        key = f"{prefix}[{i}]"
        if skip_remote and is_remote_path(entry.path):
            logger.info("Dry run: %s %s is remote, not checked offline.", key, entry.path)
            continue
        try:
            if entry.tasks == "one":
                found = [(entry.name or entry.path.rstrip("/").rsplit("/", 1)[-1], entry.path, None)]
            elif entry.tasks == "column":
                found = [(name, entry.path, None) for name in column_tasks(entry.path)]
            else:
                found = list_subtasks(entry.path, entry.revision)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{source}: {key}.path: {error}") from error
        names = [n for n, _, _ in found]
        if entry.include:
            missing = sorted(set(entry.include) - set(names))
            if missing:
                raise ConfigError(
                    f"{source}: {key}.include names {missing}, not tasks of {entry.path} (have {names})."
                )
            found = [f for f in found if f[0] in entry.include]
        for unknown in sorted(set(entry.types) - set(names)):
            raise ConfigError(f"{source}: {key}.types.{unknown}: no such task in {entry.path}.")
        for name, path, config_name in found:
            if name in out:
                raise ConfigError(f"{source}: {key}: task {name!r} is defined twice (rename one).")
            out[name] = with_suffix_rule(
                TaskSource(
                    name, path, f"{key}[{name}]", entry.types.get(name, entry.type), entry.revision, config_name,
                    entry.max_rows_per_task, None, entry.instructions.get(name),
                )
            )  # fmt: skip
    return out


__all__ = [
    "HUB_PREFIX",
    "NO_IN_BATCH_SUFFIX",
    "TaskSource",
    "expand_sources",
    "is_remote_path",
    "list_subtasks",
    "parse_hub_path",
    "resolve_tasks",
    "task_source",
    "with_suffix_rule",
]
