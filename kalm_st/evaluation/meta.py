"""Leaderboard artefacts: an mteb ``ModelMeta`` for a trained model, and a results folder for a PR to
``embeddings-benchmark/results``.

The metadata is mteb's own (``ModelMeta.from_sentence_transformer_model`` plus what only we know: revision,
languages, parameter count, Matryoshka dims, training datasets and the instruction table, carried as
``loader_kwargs["model_prompts"]`` the way mteb's ``SentenceTransformerEncoderWrapper`` takes it).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mteb.models import ModelMeta

from kalm_st.io import write_json_atomic

if TYPE_CHECKING:
    import os

    from sentence_transformers import SentenceTransformer

KALM_REFERENCE = "https://arxiv.org/abs/2506.20923"
MATRYOSHKA_DIMS: tuple[int, ...] = (896, 512, 256, 128, 64)


@contextmanager
def mteb_reading_st_meta() -> Iterator[None]:
    """Silence the one FutureWarning mteb's ``ModelMeta.from_sentence_transformer_model`` raises through no fault of
    ours: mteb 2.26 calls sentence-transformers' renamed ``get_sentence_embedding_dimension`` (now
    ``get_embedding_dimension``). Only that message is ignored, only around mteb's call."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The `get_sentence_embedding_dimension` method has been renamed", category=FutureWarning
        )
        yield


def matryoshka_dims(full_dim: int, dims: Iterable[int] = MATRYOSHKA_DIMS) -> list[int]:
    """The full dimension followed by the smaller Matryoshka dimensions, largest first."""
    return [full_dim, *sorted((d for d in dims if d < full_dim), reverse=True)]


def build_model_meta(
    model: SentenceTransformer,
    *,
    name: str,
    revision: str = "local",
    languages: Iterable[str] = ("eng-Latn",),
    training_datasets: Iterable[str] | None = None,
    prompts: Mapping[str, str] | None = None,
    release_date: str | None = None,
    license: str | None = "apache-2.0",
    reference: str | None = KALM_REFERENCE,
    public_training_code: str | None = None,
    citation: str | None = None,
    matryoshka: bool = True,
) -> ModelMeta:
    """mteb metadata for ``model``, filled offline.

    Args:
        model: The model.
        name: ``org/name`` (Hub repo id); it names the results folder.
        revision: Model revision (a commit hash once pushed).
        languages: ISO 639-3 + script codes (``"eng-Latn"``, ``"zho-Hans"``).
        training_datasets: mteb task names whose training data the model saw (zero-shot bookkeeping); ``None`` =
            unknown, an empty iterable = none.
        prompts: The instruction table; default ``model.prompts`` (kalm-st models carry the KaLM table).
        release_date: ``YYYY-MM-DD``.
        license, reference, public_training_code, citation: Passed to ``ModelMeta``.
        matryoshka: Record the Matryoshka dims (full dim first) as ``embed_dim``.
    """
    with mteb_reading_st_meta():
        base = ModelMeta.from_sentence_transformer_model(model, fill_missing=None)
    full_dim = int(model.get_embedding_dimension() or 0)
    prompt_table = dict(model.prompts if prompts is None else prompts)
    non_empty = {k: v for k, v in prompt_table.items() if v}
    n_parameters = sum(p.numel() for p in model.parameters())
    bytes_per_param = next(model.parameters()).element_size()
    return base.model_copy(
        update=dict(
            name=name,
            revision=revision,
            release_date=release_date,
            languages=list(languages),
            n_parameters=n_parameters,
            memory_usage_mb=round(n_parameters * bytes_per_param / 2**20, 1),
            embed_dim=matryoshka_dims(full_dim) if matryoshka and full_dim else full_dim,
            max_tokens=model.max_seq_length,
            license=license,
            open_weights=True,
            public_training_code=public_training_code,
            public_training_data=None,
            reference=reference,
            use_instructions=bool(non_empty),
            training_datasets=set(training_datasets) if training_datasets is not None else None,
            loader_kwargs={"model_prompts": prompt_table} if non_empty else {},
            citation=citation,
        )
    )


def export_results_folder(
    output_dir: str | os.PathLike[str],
    model_meta: ModelMeta,
    destination: str | os.PathLike[str],
    *,
    include_experiments: bool = False,
) -> Path:
    """Copy one model's results out of an evaluation ``output_dir`` into the layout of the results repository.

    ``destination/results/{org__name}/{revision}/`` gets every ``{Task}.json`` and a ``model_meta.json`` written
    from ``model_meta`` (so the PR carries the full metadata, not the empty one a local run records); experiments
    (``truncate_dim``, instruction ablations) are left out unless asked. Returns that folder.
    """
    relative = Path("results") / model_meta.model_name_as_path() / str(model_meta.revision)
    source = Path(output_dir) / relative
    if not source.is_dir():
        raise FileNotFoundError(f"No results for {model_meta.name} @ {model_meta.revision} under {source}.")
    target = Path(destination) / relative
    target.mkdir(parents=True, exist_ok=True)
    n_tasks = 0
    for item in sorted(source.iterdir()):
        if item.is_file() and item.suffix == ".json" and item.name != "model_meta.json":
            shutil.copy2(item, target / item.name)
            n_tasks += 1
        elif item.is_dir() and include_experiments:
            shutil.copytree(item, target / item.name, dirs_exist_ok=True)
    if not n_tasks:
        raise FileNotFoundError(f"No task results in {source}.")
    meta = model_meta.model_copy(update={"experiment_kwargs": None})
    write_json_atomic(target / "model_meta.json", meta.to_dict())
    return target


__all__ = [
    "KALM_REFERENCE",
    "MATRYOSHKA_DIMS",
    "build_model_meta",
    "export_results_folder",
    "matryoshka_dims",
]
