"""The KaLM instruction template, the task-instruction table, and the one resolver every consumer calls.

KaLM-Embedding-V2 (METHOD.md §2) prefixes queries with ``"Instruct: {instruction} \n Query: "``; documents of
asymmetric tasks (retrieval, reranking) get no prompt, symmetric tasks (STS, pair classification, duplicate questions)
get the instruction on both sides, single-text tasks (classification, clustering) on every text.

The per-task instructions below are the published KaLM-V2 table (as shipped in mteb's ``kalm_models.py``,
``KaLM_v2_task_prompts``); ``tests/test_instructions.py`` checks them entry by entry against the installed mteb.
The per-task-type defaults for tasks outside the table are ours [inferred] and are marked as such.

Which instruction a text gets is decided here and nowhere else (``docs/instructions.md`` has the full rules):

- :func:`resolve_instruction`: the instruction of a task (order: the row's own > the task's table entry > the task
  type's > the retrieval default) and which sides get it;
- :func:`column_prompts`: the per-column prompt strings of a task's dataset, used by training
  (:func:`kalm_st.data.build_training_prompts`) and by every curation command (``kalm-st mine | filter |
  teacher-score``), so both encode every text the same way; a column whose texts already carry the template gets
  no prompt (a text is never instructed twice);
- :func:`bake_instructions`: rows with their own ``instruction`` cannot be expressed by sentence-transformers'
  per-column prompts, so the data loader writes the resolved instruction into the texts of such a task;
- evaluation: :func:`build_prompts` turns the table into a sentence-transformers ``prompts`` dict whose keys follow
  mteb's lookup order (``"{task}-{query|document}"``, ``"{task}"``, ``"{task_type}"``, ``"query"``), so a saved model
  carries its own instructions and mteb's stock ``SentenceTransformer`` wrapper applies them per task and side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset

KALM_INSTRUCTION_TEMPLATE = "Instruct: {instruction} \n Query: "
"""Query prefix of KaLM-Embedding-V2 [read]; note the spaces around ``\n`` and the trailing space."""

RETRIEVAL_INSTRUCTION = "Given a query, retrieve documents that answer the query"
"""The retrieval default [read], also used for any task missing from the table."""

SYMMETRIC_INSTRUCTION = "Retrieve semantically similar text"
"""The STS / pair-classification instruction [read], applied to both sides."""


@dataclass(frozen=True)
class TaskInstruction:
    """The instruction of one task and whether documents get it too.

    Args:
        instruction: The task instruction, without the template.
        symmetric: True for tasks whose two sides are of the same kind (STS, pair classification, duplicate
            questions): both sides get the instruction. False for asymmetric tasks: documents get no prompt.
    """

    instruction: str
    symmetric: bool = False

    @property
    def query_prompt(self) -> str:
        return format_instruction(self.instruction)

    @property
    def document_prompt(self) -> str:
        return format_instruction(self.instruction) if self.symmetric else ""


def format_instruction(instruction: str) -> str:
    """Wrap an instruction in the KaLM template: ``"Instruct: {instruction} \n Query: "``."""
    return KALM_INSTRUCTION_TEMPLATE.format(instruction=instruction)


# Symmetric tasks of the published table: the same instruction on queries and documents [read].
_SYMMETRIC_TASKS: dict[str, str] = {
    "AFQMC": "Retrieve semantically similar text",
    "ATEC": "Retrieve semantically similar text",
    "AskUbuntuDupQuestions": "Retrieve semantically similar questions",
    "BIOSSES": "Retrieve semantically similar text",
    "BQ": "Retrieve semantically similar text",
    "CQADupstackAndroidRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackEnglishRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackGamingRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackGisRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackMathematicaRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackPhysicsRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackProgrammersRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackStatsRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackTexRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackUnixRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackWebmastersRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "CQADupstackWordpressRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "Cmnli": "Retrieve semantically similar text",
    "LCQMC": "Retrieve semantically similar text",
    "Ocnli": "Retrieve semantically similar text",
    "PAWSX": "Retrieve semantically similar text",
    "QBQTC": "Retrieve semantically similar text",
    "QuoraRetrieval": "Retrieve semantically similar questions",
    "SCIDOCS": "Given a query, retrieve documents that answer the query",
    "SICK-R": "Retrieve semantically similar text",
    "STS12": "Retrieve semantically similar text",
    "STS13": "Retrieve semantically similar text",
    "STS14": "Retrieve semantically similar text",
    "STS15": "Retrieve semantically similar text",
    "STS16": "Retrieve semantically similar text",
    "STS17": "Retrieve semantically similar text",
    "STS22": "Retrieve semantically similar text",
    "STSB": "Retrieve semantically similar text",
    "STSBenchmark": "Retrieve semantically similar text",
    "SciDocsRR": "Retrieve relevant paper titles",
    "SprintDuplicateQuestions": "Retrieve semantically similar questions",
    "StackOverflowDupQuestions": "Retrieve semantically similar questions",
    "SummEval": "Retrieve semantically similar summaries",
    "TwitterSemEval2015": "Retrieve semantically similar text",
    "TwitterURLCorpus": "Retrieve semantically similar text",
}

# Asymmetric tasks (retrieval, reranking) and single-text tasks (classification, clustering) [read].
_QUERY_ONLY_TASKS: dict[str, str] = {
    "AmazonCounterfactualClassification": "Given an Amazon review, judge whether it is counterfactual.",
    "AmazonPolarityClassification": "Classifying Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classifying the given Amazon review into its appropriate rating category",
    "ArguAna": "Given a query, retrieve documents that answer the query",
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "Banking77Classification": "Given an online banking query, find the corresponding intents",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "CLSClusteringP2P": "Identify the main category of scholar papers based on the titles and abstracts",
    "CLSClusteringS2S": "Identify the main category of scholar papers based on the titles",
    "CMedQAv1-reranking": "Given a query, retrieve documents that answer the query",
    "CMedQAv2-reranking": "Given a query, retrieve documents that answer the query",
    "ClimateFEVER": "Given a query, retrieve documents that answer the query",
    "CmedqaRetrieval": "Given a query, retrieve documents that answer the query",
    "CovidRetrieval": "Given a query, retrieve documents that answer the query",
    "DBPedia": "Given a query, retrieve documents that answer the query",
    "DuRetrieval": "Given a query, retrieve documents that answer the query",
    "EcomRetrieval": "Given a query, retrieve documents that answer the query",
    "EmotionClassification": "Classifying the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, joy, love, sadness, and surprise",
    "FEVER": "Given a query, retrieve documents that answer the query",
    "FiQA2018": "Given a query, retrieve documents that answer the query",
    "HotpotQA": "Given a query, retrieve documents that answer the query",
    "IFlyTek": "Given an App description text, find the appropriate fine-grained category",
    "ImdbClassification": "Classifying the sentiment expressed in the given movie review text from the IMDB dataset",
    "JDReview": "Classifying sentiment of the customer review for iPhone into positive or negative",
    "MMarcoReranking": "Given a query, retrieve documents that answer the query",
    "MMarcoRetrieval": "Given a query, retrieve documents that answer the query",
    "MSMARCO": "Given a query, retrieve documents that answer the query",
    "MTOPDomainClassification": "Classifying the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classifying the intent of the given utterance in task-oriented conversation",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MedicalRetrieval": "Given a query, retrieve documents that answer the query",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "MindSmallReranking": "Given a query, retrieve documents that answer the query",
    "MultilingualSentiment": "Classifying sentiment of the customer review into positive, neutral, or negative",
    "NFCorpus": "Given a query, retrieve documents that answer the query",
    "NQ": "Given a query, retrieve documents that answer the query",
    "OnlineShopping": "Classifying sentiment of the customer review into positive or negative",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "SciFact": "Given a query, retrieve documents that answer the query",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "T2Reranking": "Given a query, retrieve documents that answer the query",
    "T2Retrieval": "Given a query, retrieve documents that answer the query",
    "TNews": "Categorizing the given news title",
    "TRECCOVID": "Given a query, retrieve documents that answer the query",
    "ThuNewsClusteringP2P": "Identify the topic or theme of the given news articles based on the titles and contents",
    "ThuNewsClusteringS2S": "Identify the topic or theme of the given news articles based on the titles",
    "Touche2020": "Given a query, retrieve documents that answer the query",
    "ToxicConversationsClassification": "Classifying the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classifying the sentiment of a given tweet as either positive, negative, or neutral",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    "VideoRetrieval": "Given a query, retrieve documents that answer the query",
    "Waimai": "Classify the customer review from a food takeaway platform into positive or negative",
}

# Tasks of our offline evaluation suite that the published table does not list (kalm-st's choice).
_LOCAL_TASKS: dict[str, TaskInstruction] = {
    "TrecQAReranking": TaskInstruction(RETRIEVAL_INSTRUCTION),
    "TrecQARetrieval": TaskInstruction(RETRIEVAL_INSTRUCTION),
}

TASK_INSTRUCTIONS: Mapping[str, TaskInstruction] = MappingProxyType(
    {
        **{name: TaskInstruction(text, symmetric=True) for name, text in _SYMMETRIC_TASKS.items()},
        **{name: TaskInstruction(text) for name, text in _QUERY_ONLY_TASKS.items()},
        **_LOCAL_TASKS,
    }
)
"""Task name (as in MTEB) -> instruction. Read-only."""

TASK_TYPE_INSTRUCTIONS: Mapping[str, TaskInstruction] = MappingProxyType(
    {
        # Retrieval and reranking: the published default [read].
        "Retrieval": TaskInstruction(RETRIEVAL_INSTRUCTION),
        "Reranking": TaskInstruction(RETRIEVAL_INSTRUCTION),
        "InstructionRetrieval": TaskInstruction(RETRIEVAL_INSTRUCTION),
        # Symmetric types: the published STS instruction on both sides [read for STS; inferred for the others].
        "STS": TaskInstruction(SYMMETRIC_INSTRUCTION, symmetric=True),
        "PairClassification": TaskInstruction(SYMMETRIC_INSTRUCTION, symmetric=True),
        "Summarization": TaskInstruction(SYMMETRIC_INSTRUCTION, symmetric=True),
        "BitextMining": TaskInstruction("Retrieve parallel sentences", symmetric=True),
        # Single-text types [inferred]: generic wording in the style of the table.
        "Classification": TaskInstruction("Classify the given text into its category"),
        "MultilabelClassification": TaskInstruction("Classify the given text into its categories"),
        "Clustering": TaskInstruction("Identify the topic or theme of the given text"),
    }
)
"""MTEB task type -> fallback instruction for tasks missing from :data:`TASK_INSTRUCTIONS`."""


SINGLE_TEXT_TASK_TYPES: frozenset[str] = frozenset({"Classification", "MultilabelClassification", "Clustering"})
"""Task types whose every text is embedded with the task instruction at evaluation (mteb), so in training too."""

TASK_TYPES: tuple[str, ...] = tuple(TASK_TYPE_INSTRUCTIONS)
"""The task type names the resolver knows (MTEB's), in the order of :data:`TASK_TYPE_INSTRUCTIONS`."""

INSTRUCTED_TEXT_PATTERN = r"(?s)^Instruct: .* \n Query: "
"""A text that starts with the KaLM template (RE2 / Python syntax): it is never instructed again."""
_INSTRUCTED = re.compile(INSTRUCTED_TEXT_PATTERN)

ANCHOR_COLUMN = "anchor"


def is_document_column(column: str) -> bool:
    """``positive``, ``negative`` and ``negative_k``: the document side of a training row."""
    return column == "positive" or column == "negative" or column.startswith("negative_")


def is_text_column(column: str) -> bool:
    return column == ANCHOR_COLUMN or is_document_column(column)


def is_instructed(text: str) -> bool:
    """Whether ``text`` already starts with the KaLM template (``"Instruct: ... \n Query: "``)."""
    return _INSTRUCTED.match(text) is not None


def check_task_type(task_type: str | None) -> None:
    """Raise a ``ValueError`` naming the known types if ``task_type`` is not one (None is allowed: no type)."""
    if task_type is not None and task_type not in TASK_TYPE_INSTRUCTIONS:
        raise ValueError(f"unknown task type {task_type!r}; known task types: {', '.join(TASK_TYPES)}")


@dataclass(frozen=True)
class ResolvedInstruction:
    """The instruction one text gets, and which sides of the task get it.

    Args:
        instruction: The instruction, without the template.
        documents: Whether positives and negatives get it too (symmetric and single-text tasks), not only anchors.
        source: Where it came from: ``"row"`` (the row's own), ``"task"`` (the table), ``"type"`` (the task type's
            default) or ``"default"`` (the retrieval instruction).
    """

    instruction: str
    documents: bool
    source: Literal["row", "task", "type", "default"]

    @property
    def prompt(self) -> str:
        """The instruction in the KaLM template."""
        return format_instruction(self.instruction)

    def prompt_for(self, column: str) -> str:
        """The prompt of a column: anchors always, documents when :attr:`documents`, anything else none (``""``)."""
        if column == ANCHOR_COLUMN or (self.documents and is_document_column(column)):
            return self.prompt
        return ""


def resolve_instruction(
    task_name: str | None = None,
    task_type: str | None = None,
    row_instruction: str | None = None,
) -> ResolvedInstruction:
    """The one instruction resolver: which instruction a text of a task gets, and on which sides.

    Instruction, first that applies: the row's own ``row_instruction`` (non-blank) > the task's entry in
    :data:`TASK_INSTRUCTIONS` > the task type's entry in :data:`TASK_TYPE_INSTRUCTIONS` > the retrieval default
    :data:`RETRIEVAL_INSTRUCTION`. Sides: anchors always; documents (positive, negatives) too when the task is
    symmetric (its table entry, else its type's) or its type is single-text (:data:`SINGLE_TEXT_TASK_TYPES`: mteb
    embeds every text of such a task with the instruction). A row's own instruction goes on the same sides.

    Raises:
        ValueError: ``task_type`` is not a known type (:data:`TASK_TYPES`).
    """
    check_task_type(task_type)
    entry = TASK_INSTRUCTIONS.get(task_name) if task_name is not None else None
    type_entry = TASK_TYPE_INSTRUCTIONS.get(task_type) if task_type is not None else None
    base = entry or type_entry
    documents = (base.symmetric if base is not None else False) or task_type in SINGLE_TEXT_TASK_TYPES
    if row_instruction is not None and row_instruction.strip():
        return ResolvedInstruction(row_instruction.strip(), documents, "row")
    if entry is not None:
        return ResolvedInstruction(entry.instruction, documents, "task")
    if type_entry is not None:
        return ResolvedInstruction(type_entry.instruction, documents, "type")
    return ResolvedInstruction(RETRIEVAL_INSTRUCTION, documents, "default")


def _arrow_column(dataset: Dataset, column: str) -> pa.ChunkedArray:
    """The column's rows in the dataset's order (honours ``select`` / ``shuffle`` index mappings), as Arrow."""
    return dataset.select_columns([column]).with_format("arrow")[:][column]


def instructed_mask(texts: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """Per text, whether it already carries the KaLM template (vectorised, ``pyarrow.compute``)."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.match_substring_regex(texts, pattern=INSTRUCTED_TEXT_PATTERN), False)


def column_is_instructed(dataset: Dataset, column: str, task_name: str = "<dataset>") -> bool:
    """Whether every text of ``column`` already carries the KaLM template (none: False).

    Raises:
        ValueError: some texts carry it and others do not (naming the task, column and counts).
    """
    import pyarrow.compute as pc

    mask = instructed_mask(_arrow_column(dataset, column))
    count, total = pc.sum(mask).as_py() or 0, len(mask)
    if count == 0:
        return False
    if count == total:
        return True
    first = pc.index(mask, False).as_py()
    raise ValueError(
        f"task {task_name!r}: column {column!r}: {count} of {total} texts already start with the KaLM instruction "
        f"template ('Instruct: ... \\n Query: ') and {total - count} do not (e.g. row {first}); a column is either "
        "instructed in the data or by the task's prompt, not both. Write the instruction into every text of the "
        "column, into none, or give the rows an 'instruction' column"
    )


def column_prompts(
    data: Dataset | Sequence[str],
    task_name: str | None = None,
    task_type: str | None = None,
    *,
    instructions: bool = True,
) -> dict[str, str]:
    """The prompt of every text column (``anchor``, ``positive``, ``negative_k``) of a task: ``""`` for none.

    Training (:func:`kalm_st.data.build_training_prompts`) and the curation commands call this, so every text is
    encoded the same way in both. The prompt is :func:`resolve_instruction`'s (without a row instruction), on the
    sides it names, except:

    - ``instructions=False`` (``--no-instructions``): every prompt is ``""``, texts are encoded as written;
    - a column whose every text already carries the template (rows with their own instruction, see
      :func:`bake_instructions`, or data written by a curation command) gets ``""``: never instructed twice. This is
      checked on the data, vectorised over the Arrow column, when ``data`` is a ``Dataset`` (a sequence of column
      names is taken as uninstructed).

    Raises:
        ValueError: an unknown ``task_type``; a column that would get a prompt where some texts carry the template
            and others do not.
    """
    resolved = resolve_instruction(task_name, task_type)
    is_dataset = hasattr(data, "column_names")
    prompts: dict[str, str] = {}
    for column in data.column_names if is_dataset else list(data):
        if not is_text_column(column):
            continue
        prompt = resolved.prompt_for(column) if instructions else ""
        if prompt and is_dataset and column_is_instructed(data, column, task_name or "<dataset>"):
            prompt = ""
        prompts[column] = prompt
    return prompts


def encoding_prompts(
    data: Dataset | Sequence[str],
    task_name: str | None = None,
    task_type: str | None = None,
    *,
    instructions: bool = True,
) -> tuple[str, str]:
    """``(query_prompt, document_prompt)`` for encoding a task's anchors and its documents as one corpus.

    The curation commands' prompts: :func:`column_prompts`' prompt of ``anchor`` and the one prompt all document
    columns share. Always strings: pass them as ``prompt=`` to ``encode_query`` / ``encode_document`` (``""`` adds
    nothing, whereas ``None`` would make sentence-transformers use the model's own ``"query"`` / ``"document"``).

    Raises:
        ValueError: as :func:`column_prompts`; document columns that need different prompts (some already carry
            the template, others not), which cannot be encoded as one corpus.
    """
    prompts = column_prompts(data, task_name, task_type, instructions=instructions)
    documents = {column: prompt for column, prompt in prompts.items() if column != ANCHOR_COLUMN}
    if len(set(documents.values())) > 1:
        raise ValueError(
            f"task {task_name!r}: the document columns need different prompts ({documents}): some already carry the "
            "KaLM instruction and others do not, so they cannot be encoded as one corpus. Write the instruction into "
            "all of them or none"
        )
    return prompts.get(ANCHOR_COLUMN, ""), next(iter(documents.values()), "")


def bake_instructions(
    dataset: Dataset,
    task_name: str | None = None,
    task_type: str | None = None,
    row_instructions: Sequence[str | None] | pa.Array | None = None,
) -> Dataset:
    """Write the resolved instruction (in the template) into every text of the task that gets one.

    For a task whose rows have their own ``instruction`` (which per-column prompts cannot express): each text of the
    anchor column, and of the document columns when the task instructs documents, becomes
    ``format_instruction(row's instruction or, if blank, the task's resolved one) + text``; a text that already
    carries the template is kept as written. Afterwards every such column is instructed, so :func:`column_prompts`
    gives it no prompt. Vectorised with ``pyarrow.compute``; other columns are untouched.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset as _Dataset
    from datasets.table import InMemoryTable

    resolved = resolve_instruction(task_name, task_type)
    columns = [c for c in dataset.column_names if resolved.prompt_for(c)]
    if not columns or len(dataset) == 0:
        return dataset
    if row_instructions is None:
        own = pa.nulls(len(dataset), pa.string())
    else:
        own = pc.utf8_trim_whitespace(pa.array(row_instructions, pa.string()))
        own = pc.if_else(pc.equal(own, ""), pa.scalar(None, pa.string()), own)
    if len(own) != len(dataset):
        raise ValueError(f"bake_instructions: {len(own)} row instructions for {len(dataset)} rows")
    head, tail = KALM_INSTRUCTION_TEMPLATE.split("{instruction}")
    prefixes = pc.binary_join_element_wise(head, pc.fill_null(own, resolved.instruction), tail, "")
    table = dataset.with_format("arrow")[:]
    for column in columns:
        texts = table[column]
        baked = pc.if_else(instructed_mask(texts), texts, pc.binary_join_element_wise(prefixes, texts, ""))
        table = table.set_column(table.schema.get_field_index(column), column, baked)
    return _Dataset(InMemoryTable(table))


def get_task_instruction(task_name: str | None = None, task_type: str | None = None) -> TaskInstruction:
    """Table lookup of a task: its own entry, else its task type's, else the retrieval default.

    Unlike :func:`resolve_instruction`, an unknown type falls back to the default and ``symmetric`` is the table's
    flag only (a single-text type does not make it True); kept for callers of the table.
    """
    if task_name is not None and task_name in TASK_INSTRUCTIONS:
        return TASK_INSTRUCTIONS[task_name]
    if task_type is not None and task_type in TASK_TYPE_INSTRUCTIONS:
        return TASK_TYPE_INSTRUCTIONS[task_type]
    return TaskInstruction(RETRIEVAL_INSTRUCTION)


def training_prompt(task_name: str | None = None, task_type: str | None = None) -> tuple[str, str]:
    """``(query_prompt, document_prompt)`` of a task, from :func:`resolve_instruction` (``""``: no prompt).

    The document prompt is the query's for symmetric and single-text tasks, else ``""``.
    """
    resolved = resolve_instruction(task_name, task_type)
    return resolved.prompt, resolved.prompt if resolved.documents else ""


def build_prompts() -> dict[str, str]:
    """The whole table as a sentence-transformers ``prompts`` dict keyed the way mteb looks prompts up.

    mteb tries ``"{task}-{side}"``, then ``"{task}"``, then ``"{type}-{side}"``, ``"{type}"`` and ``"{side}"``.
    Every task gets ``"{task}"`` (its query / single-text prompt); asymmetric tasks also get an explicit empty
    ``"{task}-document"`` so documents fall through to no prompt rather than to the query's. ``"query"`` and
    ``"document"`` are the defaults of ``encode_query`` / ``encode_document``: the retrieval instruction and none.
    """
    prompts: dict[str, str] = {"query": format_instruction(RETRIEVAL_INSTRUCTION), "document": ""}
    for table in (TASK_TYPE_INSTRUCTIONS, TASK_INSTRUCTIONS):
        for name, instruction in table.items():
            prompts[name] = instruction.query_prompt
            if not instruction.symmetric:
                prompts[f"{name}-document"] = ""
    return prompts


__all__ = [
    "INSTRUCTED_TEXT_PATTERN",
    "KALM_INSTRUCTION_TEMPLATE",
    "RETRIEVAL_INSTRUCTION",
    "SINGLE_TEXT_TASK_TYPES",
    "SYMMETRIC_INSTRUCTION",
    "TASK_INSTRUCTIONS",
    "TASK_TYPES",
    "TASK_TYPE_INSTRUCTIONS",
    "ResolvedInstruction",
    "TaskInstruction",
    "bake_instructions",
    "build_prompts",
    "check_task_type",
    "column_is_instructed",
    "column_prompts",
    "encoding_prompts",
    "format_instruction",
    "get_task_instruction",
    "instructed_mask",
    "is_instructed",
    "resolve_instruction",
    "training_prompt",
]
