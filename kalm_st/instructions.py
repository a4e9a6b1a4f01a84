"""The KaLM instruction template and task-instruction table, shared by training prompts and MTEB evaluation.

KaLM-Embedding-V2 (METHOD.md §2) prefixes queries with ``"Instruct: {instruction} \n Query: "``; documents of
asymmetric tasks (retrieval, reranking) get no prompt, symmetric tasks (STS, pair classification, duplicate questions)
get the instruction on both sides.

The per-task instructions below are the published KaLM-V2 table (as shipped in mteb's ``kalm_models.py``,
``KaLM_v2_task_prompts``); ``tests/test_instructions.py`` checks them entry by entry against the installed mteb.
The per-task-type defaults for tasks outside the table are ours [inferred] and are marked as such.

One table, two consumers:

- training: :func:`training_prompt` gives the query/document prompt strings of a task for the data pipeline;
- evaluation: :func:`build_prompts` turns the table into a sentence-transformers ``prompts`` dict whose keys follow
  mteb's lookup order (``"{task}-{query|document}"``, ``"{task}"``, ``"{task_type}"``, ``"query"``), so a saved model
  carries its own instructions and mteb's stock ``SentenceTransformer`` wrapper applies them per task and side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

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


def get_task_instruction(task_name: str | None = None, task_type: str | None = None) -> TaskInstruction:
    """Instruction of a task: its own entry, else its task type's, else the retrieval default."""
    if task_name is not None and task_name in TASK_INSTRUCTIONS:
        return TASK_INSTRUCTIONS[task_name]
    if task_type is not None and task_type in TASK_TYPE_INSTRUCTIONS:
        return TASK_TYPE_INSTRUCTIONS[task_type]
    return TaskInstruction(RETRIEVAL_INSTRUCTION)


def training_prompt(task_name: str | None = None, task_type: str | None = None) -> tuple[str, str]:
    """``(query_prompt, document_prompt)`` of a task, for the training data pipeline."""
    instruction = get_task_instruction(task_name, task_type)
    return instruction.query_prompt, instruction.document_prompt


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
    "KALM_INSTRUCTION_TEMPLATE",
    "RETRIEVAL_INSTRUCTION",
    "SYMMETRIC_INSTRUCTION",
    "TASK_INSTRUCTIONS",
    "TASK_TYPE_INSTRUCTIONS",
    "TaskInstruction",
    "build_prompts",
    "format_instruction",
    "get_task_instruction",
    "training_prompt",
]
