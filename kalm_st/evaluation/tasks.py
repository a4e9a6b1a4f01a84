"""Offline MTEB tasks on the real data in ``shared/data`` (or the copies bundled under ``data/``).

Where mteb has the task built in (``STSBenchmark``, ``SICK-R``, ``Banking77Classification``), the task is mteb's own
class with only ``load_data`` replaced by a reader of the local files: name, metadata, evaluator and main score are
the leaderboard's, so the scores compare with published ones. TrecQA has no mteb task; it becomes two custom tasks on
the test split: ``TrecQAReranking`` (each question's retrieved candidates, ``map_at_1000``) and ``TrecQARetrieval``
(corpus = every test answer sentence, ``ndcg_at_10``).

Nothing here touches the network or a cache: files are read with :mod:`csv` into in-memory ``datasets.Dataset``.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.tasks.classification.eng.banking77_classification import Banking77Classification
from mteb.tasks.sts.eng.sickr_sts import SickrSTS
from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA_DIR = REPO_ROOT / "data"
"""Copies bundled with the repository (STS-B, TrecQA, Banking77; not SICK, whose licence is non-commercial)."""
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
"""The project's shared offline data, beside the checkout (CI lays it there)."""
DATA_DIR_ENV = "KALM_SHARED_DATA"
"""Environment variable naming another shared data folder (the test fixtures honour it too)."""

LOCAL_ALIAS = "local"
"""``--tasks local``: every task of :data:`LOCAL_TASKS`."""


# ----------------------------------------------------------------------------------------------------------------
# Readers: one per source folder, returning plain python rows.


def _read_csv(path: Path, fieldnames: Sequence[str] | None = None, delimiter: str = ",") -> list[dict[str, str]]:
    with path.open(encoding="utf8", newline="") as handle:
        return list(csv.DictReader(handle, fieldnames=fieldnames, delimiter=delimiter))


def _read_stsb(folder: Path) -> DatasetDict:
    rows = _read_csv(folder / "test.csv", fieldnames=("sentence1", "sentence2", "score"))  # no header upstream
    return DatasetDict({"test": _sts_dataset(rows, "sentence1", "sentence2", "score")})


def _read_sick(folder: Path) -> DatasetDict:
    # csv's default quoting would merge lines at a stray '"'; SICK is plain tab-separated text.
    with (folder / "SICK.txt").open(encoding="utf8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return DatasetDict({"test": _sts_dataset(rows, "sentence_A", "sentence_B", "relatedness_score")})


def _sts_dataset(rows: Iterable[dict[str, str]], first: str, second: str, score: str) -> Dataset:
    rows = list(rows)
    return Dataset.from_dict(
        {
            "sentence1": [row[first] for row in rows],
            "sentence2": [row[second] for row in rows],
            "score": [float(row[score]) for row in rows],
        }
    )


def _read_banking77(folder: Path) -> DatasetDict:
    categories = json.loads((folder / "categories.json").read_text(encoding="utf8"))
    label_of = {name: index for index, name in enumerate(categories)}
    splits = {}
    for split in ("train", "test"):
        rows = _read_csv(folder / f"{split}.csv")
        splits[split] = Dataset.from_dict(
            {"text": [row["text"] for row in rows], "label": [label_of[row["category"]] for row in rows]}
        )
    return DatasetDict(splits)


def _read_trecqa(
    folder: Path, split: str = "test"
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """``(queries, corpus, qrels)`` of a TrecQA split; ids are stable (order of first appearance).

    Questions without any correct answer are dropped (they score nothing and are left out of the standard
    answer-selection evaluation); a sentence listed under several questions is one corpus document.
    """
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    query_id: dict[str, str] = {}
    doc_id: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for row in _read_csv(folder / f"{split}.csv"):
        qid = query_id.setdefault(row["qtext"], f"q{len(query_id)}")
        did = doc_id.setdefault(row["atext"], f"d{len(doc_id)}")
        queries[qid] = row["qtext"]
        corpus[did] = row["atext"]
        label = int(row["label"])
        qrels.setdefault(qid, {})[did] = max(label, qrels.get(qid, {}).get(did, 0))
    answered = {qid for qid, docs in qrels.items() if any(docs.values())}
    return (
        {qid: text for qid, text in queries.items() if qid in answered},
        corpus,
        {qid: docs for qid, docs in qrels.items() if qid in answered},
    )


def _retrieval_split(
    queries: dict[str, str], corpus: dict[str, str], qrels: dict[str, dict[str, int]], *, rerank: bool
) -> RetrievalSplitData:
    if rerank:  # each question is scored only against its own retrieved candidates
        corpus = {did: corpus[did] for docs in qrels.values() for did in docs}
    return RetrievalSplitData(
        queries=Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
        corpus=Dataset.from_dict({"id": list(corpus), "title": [""] * len(corpus), "text": list(corpus.values())}),
        relevant_docs=qrels,
        top_ranked={qid: list(docs) for qid, docs in qrels.items()} if rerank else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Tasks: mteb's classes (official metadata and main score) with a local `load_data`.


class _LocalDataMixin:
    """``load_data`` from a local folder instead of the Hub; the rest of the mteb task is untouched."""

    data_folder: str
    _reader: Callable[[Path], Any]

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.data_dir = Path(data_dir) if data_dir is not None else None

    def check_if_dataset_is_superseded(self) -> None:
        """mteb warns twice (log and ``warnings``) that e.g. STSBenchmark has a v2; the local tasks are the versions
        whose published scores kalm-st compares with, chosen on purpose: say it once, at INFO."""
        superseded_by = getattr(self, "superseded_by", None)
        if superseded_by:
            logger.info(
                "%s: the published scores compared with are this version's (mteb has %s)",
                self.metadata.name,  # type: ignore[attr-defined]
                superseded_by,
            )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:  # type: ignore[attr-defined]
            return
        name = self.metadata.name  # type: ignore[attr-defined]
        folder = self.data_dir if self.data_dir is not None else find_task_data(name)
        logger.info("Loading %s from %s", name, folder)
        self.dataset = type(self)._reader(folder)
        self.dataset_transform(num_proc=num_proc)  # type: ignore[attr-defined]
        self.data_loaded = True
        self.data_folder_read = folder
        self.sample_counts = _sample_counts(self.dataset, ["test", "train"])


def _sample_counts(dataset: Any, splits: Sequence[str]) -> dict[str, int]:
    """Samples per split as MTEB counts them (pairs, texts, or queries of a retrieval split); kept after mteb
    unloads the data, for the results' provenance."""
    counts: dict[str, int] = {}
    for split in splits:
        part = dataset.get(split) if hasattr(dataset, "get") else None
        if part is None and hasattr(dataset, "get") and dataset.get("default") is not None:
            part = dataset["default"].get(split)
        if part is None:
            continue
        queries = part.get("queries") if isinstance(part, dict) else None
        counts[split] = len(queries) if queries is not None else len(part)
    return counts


class LocalSTSBenchmark(_LocalDataMixin, STSBenchmarkSTS):
    """mteb's ``STSBenchmark`` (test split, Spearman of cosine) on ``stsb/test.csv``."""

    data_folder = "stsb"
    _reader = staticmethod(_read_stsb)


class LocalSICKR(_LocalDataMixin, SickrSTS):
    """mteb's ``SICK-R`` (all 9,927 pairs are its test set) on ``sick/SICK.txt``."""

    data_folder = "sick"
    _reader = staticmethod(_read_sick)


class LocalBanking77Classification(_LocalDataMixin, Banking77Classification):
    """mteb's ``Banking77Classification`` (logistic regression, 10 x 8 samples per label) on ``banking77/``."""

    data_folder = "banking77"
    _reader = staticmethod(_read_banking77)


_TRECQA_COMMON: dict[str, Any] = dict(
    reference="https://aclanthology.org/D07-1003/",
    category="t2t",
    modalities=["text"],
    eval_splits=["test"],
    eval_langs=["eng-Latn"],
    date=("1999-01-01", "2007-12-31"),
    domains=["News", "Written"],
    task_subtypes=["Question answering"],
    license="not specified",
    annotations_creators="human-annotated",
    dialect=[],
    sample_creation="found",
    bibtex_citation=r"""
@inproceedings{wang-etal-2007-jeopardy,
  address = {Prague, Czech Republic},
  author = {Wang, Mengqiu and Smith, Noah A. and Mitamura, Teruko},
  booktitle = {Proceedings of the 2007 Joint Conference on Empirical Methods in Natural Language Processing and Computational Natural Language Learning ({EMNLP}-{C}o{NLL})},
  pages = {22--32},
  title = {What is the {J}eopardy Model? A Quasi-Synchronous Grammar for {QA}},
  url = {https://aclanthology.org/D07-1003},
  year = {2007},
}
""",
)


class TrecQAReranking(_LocalDataMixin, AbsTaskRetrieval):
    """TrecQA answer-sentence selection (Wang et al. 2007, test): rank each question's retrieved candidates."""

    data_folder = "trecqa"
    metadata = TaskMetadata(
        name="TrecQAReranking",
        description="TrecQA answer-sentence selection (test): rerank the candidate sentences a retriever returned "
        "for each TREC question; questions without a correct candidate are dropped.",
        dataset={"path": "brmson/dataset-sts:data/anssel/wang", "revision": "e1d3375f"},
        type="Reranking",
        main_score="map_at_1000",
        **_TRECQA_COMMON,
    )

    @staticmethod
    def _reader(folder: Path) -> dict[str, dict[str, RetrievalSplitData]]:
        return {"default": {"test": _retrieval_split(*_read_trecqa(folder), rerank=True)}}


class TrecQARetrieval(_LocalDataMixin, AbsTaskRetrieval):
    """TrecQA as retrieval: each test question against every test answer sentence."""

    data_folder = "trecqa"
    metadata = TaskMetadata(
        name="TrecQARetrieval",
        description="TrecQA (test) as retrieval: each TREC question against the corpus of all test answer "
        "sentences; relevant = the sentences marked correct for it.",
        dataset={"path": "brmson/dataset-sts:data/anssel/wang", "revision": "e1d3375f"},
        type="Retrieval",
        main_score="ndcg_at_10",
        **_TRECQA_COMMON,
    )

    @staticmethod
    def _reader(folder: Path) -> dict[str, dict[str, RetrievalSplitData]]:
        return {"default": {"test": _retrieval_split(*_read_trecqa(folder), rerank=False)}}


LOCAL_TASKS: dict[str, type[_LocalDataMixin]] = {
    "STSBenchmark": LocalSTSBenchmark,
    "SICK-R": LocalSICKR,
    "Banking77Classification": LocalBanking77Classification,
    "TrecQAReranking": TrecQAReranking,
    "TrecQARetrieval": TrecQARetrieval,
}
"""Task name -> offline task class. The names are mteb's where mteb has the task."""


# ----------------------------------------------------------------------------------------------------------------
# Lookup.


def data_dir_candidates(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for local data: ``data_dir`` alone if given, else the bundled copy, ``$KALM_SHARED_DATA``
    and ``../shared/data``."""
    if data_dir is not None:
        return [Path(data_dir)]
    candidates = [BUNDLED_DATA_DIR]
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]))
    candidates.append(SHARED_DATA_DIR)
    return candidates


def find_task_data(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding the data of local task ``name`` (e.g. ``.../shared/data/stsb``); ``FileNotFoundError`` if none."""
    folder_name = LOCAL_TASKS[name].data_folder
    candidates = data_dir_candidates(data_dir)
    for candidate in candidates:
        if (candidate / folder_name).is_dir():
            return candidate / folder_name
    tried = ", ".join(str(c / folder_name) for c in candidates)
    raise FileNotFoundError(
        f"No local data for task {name!r}: looked for {tried}. Pass --data-dir (a folder with "
        f"stsb/, sick/, banking77/, trecqa/ as in shared/data) or set ${DATA_DIR_ENV}."
    )


def local_tasks(names: Iterable[str] | None = None, data_dir: str | os.PathLike[str] | None = None) -> list[AbsTask]:
    """Offline task instances, each reading the first folder that has its data; default (``"local"``): every task of
    :data:`LOCAL_TASKS` whose data is found (a warning names each one skipped)."""
    if names is None:  # "local": every task whose data is found (SICK-R is not bundled: its licence is non-commercial)
        selected = []
        for name in LOCAL_TASKS:
            try:
                find_task_data(name, data_dir)
                selected.append(name)
            except FileNotFoundError as error:
                logger.warning("'local' skips %s: %s", name, error)
        if not selected:
            find_task_data(next(iter(LOCAL_TASKS)), data_dir)  # raises, naming where it looked
    else:
        selected = list(names)
    for name in selected:
        if name not in LOCAL_TASKS:
            raise ValueError(unknown_task_message(name, LOCAL_TASKS))
    return [LOCAL_TASKS[name](data_dir=find_task_data(name, data_dir)) for name in selected]


def unknown_task_message(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if not close:  # also try case-insensitive prefixes (``sts`` -> STS12, STSBenchmark, ...)
        close = [k for k in known if k.lower().startswith(name.lower())][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown task {name!r}.{hint} Local tasks: {', '.join(LOCAL_TASKS)} (or 'local')."


def resolve_tasks(
    names: Sequence[str] | None = None,
    benchmark: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[AbsTask]:
    """Tasks by name or benchmark: ``"local"`` and the names of :data:`LOCAL_TASKS` become offline tasks, any other
    name is looked up in mteb (it may need the network to load its data). Unknown names raise ``ValueError`` listing
    close matches."""
    import mteb

    if (names is None) == (benchmark is None):
        raise ValueError("Give either task names or a benchmark name.")
    if benchmark is not None:
        if benchmark == LOCAL_ALIAS:
            return local_tasks(data_dir=data_dir)
        try:
            return list(mteb.get_benchmark(benchmark).tasks)
        except KeyError:
            benchmarks = [b.name for b in mteb.get_benchmarks()]
            close = difflib.get_close_matches(benchmark, benchmarks, n=5, cutoff=0.4)
            raise ValueError(
                f"Unknown benchmark {benchmark!r}." + (f" Did you mean: {', '.join(close)}?" if close else "")
            ) from None
    assert names is not None
    expanded: list[str] = []
    for name in names:
        for part in (p.strip() for p in name.split(",")):
            if part == LOCAL_ALIAS:
                expanded.extend(t.metadata.name for t in local_tasks(data_dir=data_dir))
            elif part:
                expanded.append(part)
    expanded = list(dict.fromkeys(expanded))
    if not expanded:
        raise ValueError("No task names given.")
    remote: dict[str, AbsTask] = {}
    for name in (n for n in expanded if n not in LOCAL_TASKS):
        try:  # one task at a time: listing all of mteb's (~3,800) instantiates each, ~15 s on a small CPU
            remote[name] = mteb.get_task(name)
        except KeyError:
            known = set(LOCAL_TASKS) | {t.metadata.name for t in mteb.get_tasks(exclude_superseded=False)}
            raise ValueError(unknown_task_message(name, sorted(known))) from None
    local = {t.metadata.name: t for t in local_tasks([n for n in expanded if n in LOCAL_TASKS], data_dir)}
    return [local[n] if n in local else remote[n] for n in expanded]


__all__ = [
    "BUNDLED_DATA_DIR",
    "LOCAL_ALIAS",
    "LOCAL_TASKS",
    "SHARED_DATA_DIR",
    "LocalBanking77Classification",
    "LocalSICKR",
    "LocalSTSBenchmark",
    "TrecQAReranking",
    "TrecQARetrieval",
    "data_dir_candidates",
    "find_task_data",
    "local_tasks",
    "resolve_tasks",
    "unknown_task_message",
]
