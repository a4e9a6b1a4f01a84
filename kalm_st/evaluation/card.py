"""The model card kalm-st writes: recipe (the resolved stage configs, losses with hyperparameters and citations),
training data, instructions, MTEB results as ``model-index`` (full tasks only; subsets in the text), usage with the
query/document prompts, serving commands per runtime, license. Written into every final model folder
(:func:`write_model_card`) and built again for a push (:mod:`kalm_st.evaluation.hub`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kalm_st.instructions import RETRIEVAL_INSTRUCTION, SYMMETRIC_INSTRUCTION, format_instruction
from kalm_st.serving.runtimes import serving_section

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "resolved_config.yaml"
TRAINING_DATA_NAME = "training_data.yaml"  # kalm_st.recipe.config's name (not imported: no torch at card time)

MRL_BIBTEX = """
@inproceedings{kusupati2022matryoshka,
  title     = {Matryoshka Representation Learning},
  author    = {Kusupati, Aditya and Bhatt, Gantavya and Rege, Aniket and Wallingford, Matthew and Sinha, Aditya and Ramanujan, Vivek and Howard-Snyder, William and Chen, Kaifeng and Kakade, Sham and Jain, Prateek and Farhadi, Ali},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2205.13147}
}
"""

SBERT_BIBTEX = """
@inproceedings{reimers-2019-sentence-bert,
  title     = {Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks},
  author    = {Reimers, Nils and Gurevych, Iryna},
  booktitle = {Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing},
  year      = {2019},
  url       = {https://arxiv.org/abs/1908.10084}
}
"""


# ----------------------------------------------------------------------------------------------------------------
# Recipe: the resolved stage configs the trainer saves next to each stage's output.


def find_training_configs(model_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The resolved configs of the stages that produced ``model_dir``, first stage first.

    Looks for ``resolved_config.yaml`` in the model folder or its parent (``{output_dir}/final``), then follows
    ``model.init_from`` (and a soup step's ``soup.models``) back to earlier stages.
    """
    configs: list[dict[str, Any]] = []
    seen: set[Path] = set()
    pending = [Path(model_dir)]
    while pending:
        folder = pending.pop()
        for candidate in (folder / RESOLVED_CONFIG_NAME, folder.parent / RESOLVED_CONFIG_NAME):
            if candidate.is_file() and candidate.resolve() not in seen:
                seen.add(candidate.resolve())
                config = yaml.safe_load(candidate.read_text(encoding="utf8")) or {}
                data_record = candidate.parent / TRAINING_DATA_NAME  # rows and instructions, written by the stage
                if data_record.is_file():
                    tasks = (yaml.safe_load(data_record.read_text(encoding="utf8")) or {}).get("tasks") or {}
                    config = {**config, "training_data": tasks}
                configs.append(config)
                sources = [((config.get("model") or {}).get("init_from"))]
                sources += list((config.get("soup") or {}).get("models") or [])
                # a stage's final/ may be gone (a recipe's keep_intermediate_models: false); its record stays beside it
                pending.extend(
                    Path(s)
                    for s in sources
                    if s and (Path(s).exists() or (Path(s).parent / RESOLVED_CONFIG_NAME).is_file())
                )
                break
    return list(reversed(configs))


def loss_citations(config: Mapping[str, Any]) -> list[str]:
    """BibTeX entries for one stage's loss (KaLM-V2 always; focal loss, MoCHi, GradCache, MRL as used)."""
    from kalm_st.losses import FOCAL_LOSS_BIBTEX, GRADCACHE_BIBTEX, KALM_V2_BIBTEX, MOCHI_BIBTEX

    loss = config.get("loss") or {}
    text = yaml.safe_dump(loss).lower()
    entries = [KALM_V2_BIBTEX]
    if "focal" in text:
        entries.append(FOCAL_LOSS_BIBTEX)
    if "hard_negative_mixing" in text and "hard_negative_mixing: null" not in text:
        entries.append(MOCHI_BIBTEX)
    if "cached" in text or "mini_batch_size" in text:
        entries.append(GRADCACHE_BIBTEX)
    if (config.get("matryoshka") or {}).get("enabled"):
        entries.append(MRL_BIBTEX)
    return entries


BUILTIN_BASE_MODELS: dict[str, str] = {"builtin:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Hub ids of the built-in backbones that have one (``builtin:smollm2-135m`` is a GGUF of that model)."""


def base_model_of(configs: Sequence[Mapping[str, Any]]) -> str | None:
    """The Hub id the first stage started from (``model.init_from``), if it is one; None for a local folder."""
    for config in configs:
        start = (config.get("model") or {}).get("init_from")
        if not start:
            continue
        if start in BUILTIN_BASE_MODELS:
            return BUILTIN_BASE_MODELS[start]
        materialised = Path(start)
        if materialised.parent.name == "builtin" and f"builtin:{materialised.name}" in BUILTIN_BASE_MODELS:
            return BUILTIN_BASE_MODELS[f"builtin:{materialised.name}"]  # a recipe's converted copy of a built-in
        if start.startswith("builtin:") or materialised.exists() or start.count("/") != 1:
            return None
        return start
    return None


def architecture_of(model: SentenceTransformer) -> str:
    """``"bidirectional Llama decoder"`` / ``"BERT encoder"``: what the model's first module really holds."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    if config is None:
        return "transformer"
    family = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama", "mistral": "Mistral", "gemma": "Gemma"}.get(
        config.model_type, config.model_type
    )
    if getattr(config, "is_decoder", False) or getattr(config, "is_causal", None) is not None:
        bidirectional = getattr(config, "is_causal", True) is False
        return f"{'bidirectional ' if bidirectional else ''}{family} decoder"
    return f"{family} encoder"


def _recipe_section(configs: Sequence[Mapping[str, Any]], architecture: str = "transformer") -> str:
    if not configs:
        return (
            f"## Training recipe\n\nA {architecture} with mean pooling trained with kalm-st. The stage configs were "
            "not found next to the model, so the stages, data and hyperparameters are not listed here.\n"
        )
    parts = ["## Training recipe\n"]
    for index, config in enumerate(configs, 1):
        stage = config.get("stage", f"stage {index}")
        parts.append(f"### Stage {index}: {stage}\n")
        loss = config.get("loss")
        if loss:
            parts.append(f"- **Loss**: `{loss.get('name')}`")
            for key, value in (loss.get("kwargs") or {}).items():
                parts.append(f"  - `{key}`: `{value}`")
        matryoshka = config.get("matryoshka") or {}
        if matryoshka.get("enabled"):
            parts.append(f"- **Matryoshka**: dims `{matryoshka.get('dims')}`, weights `{matryoshka.get('weights')}`")
        data = config.get("data") or {}
        trained_on = config.get("training_data") or {}
        if trained_on:
            parts.append("- **Data** (rows trained on, after the stage's filtering and sampling):\n")
            parts.append("  | task | type | source | rows |\n  |---|---|---|---:|")
            for name, task in trained_on.items():
                source = f"`{task.get('path')}`" + (f" @ `{task['revision']}`" if task.get("revision") else "")
                parts.append(f"  | {name} | {task.get('type') or 'Retrieval'} | {source} | {task.get('rows')} |")
            parts.append("")
        else:
            for name, task in (data.get("tasks") or {}).items():
                parts.append(f"- **Data** `{name}`: `{task.get('path')}` ({task.get('type')})")
        soup = config.get("soup") or {}
        if soup:
            parts.append(
                f"- **Model soup** of {len(soup.get('models') or [])} checkpoints, weights `{soup.get('weights')}`"
            )
        args = config.get("args") or {}
        keys = (
            "learning_rate",
            "per_device_train_batch_size",
            "num_train_epochs",
            "max_steps",
            "warmup_steps",
            "bf16",
        )
        hyper = ", ".join(f"`{k}={args[k]}`" for k in keys if k in args)
        if hyper:
            parts.append(f"- **Hyperparameters**: {hyper}")
        parts.append("")
    return "\n".join(parts) + "\n"


def _instructions_section(configs: Sequence[Mapping[str, Any]]) -> str:
    """The instruction each training task's texts were given, per column, in the stages' own records."""
    columns: dict[tuple[str, str], list[str]] = {}  # (task, instruction) -> the columns that got it
    for config in configs:
        for task, record in (config.get("training_data") or {}).items():
            for column, prompt in (record.get("instructions") or {}).items():
                named = columns.setdefault((task, prompt or ""), [])
                if column not in named:
                    named.append(column)
    if not columns:
        return ""
    lines = [
        "## Instructions used in training\n",
        "Each training text was prefixed with its task's instruction (none: the text as it is). The model's",
        "`prompts` carry the same instructions, and those of other tasks, for encoding and MTEB evaluation.\n",
        "| task | columns | instruction |",
        "|---|---|---|",
    ]
    for (task, prompt), named in columns.items():
        shown = prompt.replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| {task} | {', '.join(named)} | {f'`{shown}`' if prompt else 'none'} |")
    return "\n".join(lines) + "\n\n"


# ----------------------------------------------------------------------------------------------------------------
# Results and card.


@dataclass
class LocalScore:
    """A score that is not an MTEB task's: a subset of a task's data, or a task MTEB does not have (TrecQA)."""

    task: str
    metric: str
    value: float
    note: str
    """E.g. ``"subset: 200 of 1379 test samples"`` or ``"kalm-st offline task, not in MTEB"``."""


def find_results_folders(path: str | os.PathLike[str]) -> list[Path]:
    """Every model results folder (``.../{org__name}/{revision}/`` with task files) under ``path``: an ``eval``
    output, a recipe's eval step folder, or one model's results folder. One-line ``FileNotFoundError`` if none."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"Results folder {str(root)!r} does not exist.")
    from kalm_st.evaluation.run import IDENTITY_FILE, PROVENANCE_FILE

    skip = {"model_meta.json", IDENTITY_FILE, PROVENANCE_FILE}
    folders = sorted(
        {
            p.parent
            for p in root.rglob("*.json")
            if p.name not in skip and "experiments" not in p.parts[-4:-1] and '"task_name"' in p.read_text("utf8")
        }
    )
    if not folders:
        raise FileNotFoundError(
            f"No MTEB results under {str(root)!r}: give the folder `kalm-st eval --output` wrote, or a recipe's eval "
            "step folder."
        )
    return folders


def _select_results(folders: list[Path], fingerprint: str | None, model_meta_name: str | None, where: Path) -> Path:
    """The results folder of the pushed model: named ``model_meta_name``, else the one whose recorded fingerprint is
    the model's; never another model's."""

    from kalm_st.evaluation.run import IDENTITY_FILE

    if model_meta_name is not None:
        named = [f for f in folders if f.parent.name == model_meta_name.replace("/", "__")]
        if len(named) == 1:
            return named[0]
        raise FileNotFoundError(
            f"{len(named) or 'No'} results folders of {model_meta_name!r} under {str(where)!r} "
            f"(found: {', '.join(f'{f.parent.name}/{f.name}' for f in folders)})."
        )
    if fingerprint is not None:
        for folder in folders:
            identity = folder / IDENTITY_FILE
            if (
                identity.is_file()
                and (yaml.safe_load(identity.read_text(encoding="utf8")) or {}).get("fingerprint") == fingerprint
            ):
                return folder
    if len(folders) == 1 and fingerprint is None:
        return folders[0]
    raise FileNotFoundError(
        f"None of the results under {str(where)!r} are of this model (fingerprint {fingerprint}; found: "
        f"{', '.join(f'{f.parent.name}/{f.name}' for f in folders)}): evaluate it with `kalm-st eval`, or name the "
        "results with --results-model-name."
    )


def eval_results_from_dir(
    output_dir: str | os.PathLike[str],
    model_meta_name: str | None = None,
    *,
    fingerprint: str | None = None,
    local_scores: list[LocalScore] | None = None,
) -> list[EvalResult]:
    """``huggingface_hub.EvalResult`` entries (the card's ``model-index``) of one model's main runs.

    Only tasks evaluated on the whole of an MTEB task's data enter: a subset of a task (the quickstart's 200 STS-B
    test pairs) or a task MTEB does not have is appended to ``local_scores`` instead, with what it is, so a
    leaderboard never reads it as the MTEB task. The model's folder is picked by ``model_meta_name``, else by the
    weights ``fingerprint`` recorded by :func:`kalm_st.evaluation.evaluate_model`.
    """

    from huggingface_hub import EvalResult
    from mteb.results import TaskResult

    from kalm_st.evaluation.run import IDENTITY_FILE, PROVENANCE_FILE

    folders = find_results_folders(output_dir)
    folder = _select_results(folders, fingerprint, model_meta_name, Path(output_dir))
    provenance_file = folder / PROVENANCE_FILE
    provenance = (
        (yaml.safe_load(provenance_file.read_text(encoding="utf8")) or {}) if provenance_file.is_file() else {}
    )
    results: list[EvalResult] = []
    for path in sorted(folder.glob("*.json")):
        if path.name in ("model_meta.json", IDENTITY_FILE, PROVENANCE_FILE):
            continue
        task_result = TaskResult.from_disk(path)
        task = task_result.task_name
        note = _not_full_mteb(task, provenance.get(task))
        if note is not None:
            if local_scores is not None:
                from kalm_st.evaluation.tasks import LOCAL_TASKS

                main = LOCAL_TASKS[task].metadata.main_score if task in LOCAL_TASKS else "main_score"
                local_scores.append(LocalScore(task, main, round(100 * float(task_result.get_score()), 2), note))
            continue
        try:
            import mteb

            metadata = mteb.get_task(task).metadata
            task_type, dataset, main = metadata.type, metadata.dataset.get("path", task), metadata.main_score
        except KeyError:  # an offline task mteb does not register (TrecQA*)
            from kalm_st.evaluation.tasks import LOCAL_TASKS

            metadata = LOCAL_TASKS[task].metadata if task in LOCAL_TASKS else None
            task_type = metadata.type if metadata else "Other"
            dataset = metadata.dataset.get("path", task) if metadata else task
            main = metadata.main_score if metadata else "main_score"
        for split, subsets in task_result.scores.items():
            for subset in subsets:
                results.append(
                    EvalResult(
                        task_type=task_type,
                        dataset_type=dataset,
                        dataset_name=f"MTEB {task} ({subset['hf_subset']})",
                        dataset_config=subset["hf_subset"],
                        dataset_split=split,
                        dataset_revision=task_result.dataset_revision,
                        metric_type=main,
                        metric_value=round(100 * float(subset["main_score"]), 2),
                        source_name="MTEB",
                        source_url="https://github.com/embeddings-benchmark/mteb",
                    )
                )
    return results


def _not_full_mteb(task: str, provenance: Mapping[str, Any] | None) -> str | None:
    """Why a task's score is not the MTEB task's (None when it is: an mteb run, or a local run on all its data)."""
    from kalm_st.evaluation.tasks import LOCAL_TASKS

    if task not in LOCAL_TASKS:
        return None  # mteb loaded the task's own data
    if provenance is None:
        return "local data of unknown size (evaluated before kalm-st recorded it)"
    if not provenance.get("in_mteb"):
        return "kalm-st offline task, not in MTEB"
    if provenance.get("full"):
        return None
    counts = provenance.get("samples") or {}
    official = provenance.get("mteb_samples") or {}
    parts = [f"{counts[split]} of {official.get(split, '?')} {split} samples" for split in counts]
    return "subset: " + ", ".join(parts)


def build_model_card(
    model: SentenceTransformer,
    repo_id: str,
    *,
    eval_results: Sequence[EvalResult] = (),
    training_configs: Sequence[Mapping[str, Any]] = (),
    license: str = "apache-2.0",
    languages: Iterable[str] | None = None,
    base_model: str | None = None,
    local_scores: Sequence[LocalScore] = (),
) -> ModelCard:
    """A model card: YAML metadata with ``model-index`` + recipe, losses, citations, results, usage, license.

    ``model-index`` holds only full MTEB tasks (``eval_results``); ``local_scores`` (subsets, tasks MTEB does not
    have) are listed in the body with what they are. ``base_model`` defaults to the first stage's Hub id.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if base_model is None:
        base_model = base_model_of(training_configs)
    card_data = ModelCardData(
        language=list(languages) if languages else None,
        license=license,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=["sentence-transformers", "feature-extraction", "sentence-similarity", "kalm-st", "mteb"],
        base_model=base_model,
        model_name=repo_id.split("/")[-1],
        eval_results=list(eval_results) or None,
    )
    query_prompt = model.prompts.get("query") or format_instruction(RETRIEVAL_INSTRUCTION)
    sts_prompt = format_instruction(SYMMETRIC_INSTRUCTION)
    dim = model.get_embedding_dimension()
    results_table = ""
    if eval_results:
        rows = [
            f"| {r.dataset_name} | {r.dataset_split} | {r.metric_type} | {r.metric_value:.2f} |" for r in eval_results
        ]
        results_table = "| task | split | metric | score |\n|---|---|---|---:|\n" + "\n".join(rows) + "\n"
    if local_scores:
        rows = [f"| {s.task} | {s.note} | {s.metric} | {s.value:.2f} |" for s in local_scores]
        results_table += (
            "\nNot MTEB scores (a subset of a task's data, or a task MTEB does not have; left out of `model-index`):"
            "\n\n| task | data | metric | score |\n|---|---|---|---:|\n" + "\n".join(rows) + "\n"
        )
    citations: list[str] = []
    for config in training_configs or [{}]:
        for entry in loss_citations(config):
            if entry not in citations:
                citations.append(entry)
    citations.append(SBERT_BIBTEX)
    body = f"""# {repo_id.split("/")[-1]}

A sentence embedding model trained with [kalm-st](https://arxiv.org/abs/2506.20923), the KaLM-Embedding-V2 recipe
on sentence-transformers: a {architecture_of(model)}{f" from `{base_model}`" if base_model else ""}, mean pooling, L2 normalisation, {dim}-d embeddings
(Matryoshka: truncate to fewer dimensions with `truncate_dim`), up to {model.max_seq_length} tokens.

## Usage

Queries take a task instruction (`"Instruct: {{instruction}} \\n Query: "`); documents of retrieval tasks take none.
The model ships its instruction table in `model.prompts`: `encode_query` / `encode_document` apply the
retrieval defaults, and `prompt_name="<MTEB task name>"` picks a task's instruction.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{repo_id}")
queries = model.encode_query(["how do I reset my card PIN?"])          # prompt: {query_prompt!r}
documents = model.encode_document(["You can reset your PIN in the app under Card > PIN."])  # no prompt
print(model.similarity(queries, documents))

# Symmetric tasks (STS, pair classification): the same instruction on both sides.
pair = model.encode(["A man plays a guitar.", "Someone is playing guitar."], prompt={sts_prompt!r})
```

{serving_section(repo_id, query_prompt)}
{_recipe_section(training_configs, architecture_of(model))}
{_instructions_section(training_configs)}## MTEB results

{results_table or "No MTEB results were supplied."}
## License

{license}

## Citation

```bibtex
{"".join(citations).strip()}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def write_model_card(model_dir: str | os.PathLike[str], model: SentenceTransformer | None = None) -> Path:
    """Write kalm-st's card (recipe from the stage configs next to the model, base model, architecture) as
    ``model_dir/README.md``, in place of sentence-transformers' automatic one."""
    from kalm_st.io import write_text_atomic

    folder = Path(model_dir)
    if model is None:
        from kalm_st.model_source import resolve_model

        model = resolve_model(folder, hub="embedder")
    card = build_model_card(model, folder.resolve().name, training_configs=find_training_configs(folder))
    return write_text_atomic(folder / "README.md", str(card))


__all__ = [
    "LocalScore",
    "build_model_card",
    "eval_results_from_dir",
    "find_results_folders",
    "find_training_configs",
    "loss_citations",
    "write_model_card",
]
