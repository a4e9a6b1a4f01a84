"""The instruction table against the published KaLM-V2 prompts (as shipped by the installed mteb)."""

from __future__ import annotations

import pytest
from mteb.models.model_implementations.kalm_models import KaLM_INSTRUCTION, KaLM_v2_task_prompts

from kalm_st.instructions import (
    KALM_INSTRUCTION_TEMPLATE,
    TASK_INSTRUCTIONS,
    build_prompts,
    format_instruction,
    get_task_instruction,
    resolve_instruction,
    training_prompt,
)


def test_template_is_kalms():
    assert KALM_INSTRUCTION_TEMPLATE == KaLM_INSTRUCTION == "Instruct: {instruction} \n Query: "
    assert format_instruction("X") == "Instruct: X \n Query: "


def test_table_equals_the_published_kalm_v2_prompts():
    for key, published in KaLM_v2_task_prompts.items():
        name, _, side = key.rpartition("-")
        if side in ("query", "document"):
            entry = TASK_INSTRUCTIONS[name]
            assert entry.instruction == published and entry.symmetric, key
        else:
            entry = TASK_INSTRUCTIONS[key]
            assert entry.instruction == published and not entry.symmetric, key


@pytest.mark.parametrize(
    ("task", "query_prompt", "document_prompt"),
    [
        # Asymmetric retrieval: only queries are instructed.
        ("NQ", "Instruct: Given a query, retrieve documents that answer the query \n Query: ", ""),
        # Symmetric STS: both sides.
        (
            "STSBenchmark",
            "Instruct: Retrieve semantically similar text \n Query: ",
            "Instruct: Retrieve semantically similar text \n Query: ",
        ),
        (
            "SICK-R",
            "Instruct: Retrieve semantically similar text \n Query: ",
            "Instruct: Retrieve semantically similar text \n Query: ",
        ),
        (
            "Banking77Classification",
            "Instruct: Given an online banking query, find the corresponding intents \n Query: ",
            "",
        ),
        # Not in the table: the retrieval default.
        ("SomeNewRetrievalTask", "Instruct: Given a query, retrieve documents that answer the query \n Query: ", ""),
    ],
)
def test_training_prompts(task, query_prompt, document_prompt):
    assert training_prompt(task) == (query_prompt, document_prompt)


def test_task_type_fallback():
    assert get_task_instruction("UnknownSTS", "STS").symmetric
    assert get_task_instruction("UnknownRetrieval", "Retrieval").instruction == (
        "Given a query, retrieve documents that answer the query"
    )


def test_prompts_follow_mtebs_lookup_order():
    import mteb
    from mteb.models.abs_encoder import get_prompt
    from mteb.types import PromptType

    prompts = build_prompts()
    sts = mteb.get_task("STSBenchmark").metadata
    nq = mteb.get_task("NQ").metadata
    banking = mteb.get_task("Banking77Classification").metadata
    assert get_prompt(prompts, sts, PromptType.query) == get_prompt(prompts, sts, PromptType.document)
    assert get_prompt(prompts, sts, PromptType.document).startswith("Instruct: Retrieve semantically similar text")
    assert get_prompt(prompts, nq, PromptType.query).startswith("Instruct: Given a query, retrieve documents")
    assert get_prompt(prompts, nq, PromptType.document) == ""
    assert "online banking" in get_prompt(prompts, banking, None)


# ----------------------------------------------------------------------------------------------------------------------
# The resolver: row > task > type > default, and which sides
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "task_type", "row", "instruction", "documents", "source"),
    [
        # the row's own instruction wins, on the task's sides
        ("STSBenchmark", "STS", " Find paraphrases ", "Find paraphrases", True, "row"),
        ("NQ", None, "Find the answer", "Find the answer", False, "row"),
        # a blank row instruction is none
        ("NQ", None, "  ", "Given a query, retrieve documents that answer the query", False, "task"),
        # the table beats the type (and its symmetric flag decides the sides)
        ("SciDocsRR", "Retrieval", None, "Retrieve relevant paper titles", True, "task"),
        # a single-text type instructs documents even where the table's entry does not
        ("Banking77Classification", "Classification", None,
         "Given an online banking query, find the corresponding intents", True, "task"),
        ("Banking77Classification", None, None, "Given an online banking query, find the corresponding intents",
         False, "task"),
        # unknown task: the type's default
        ("my_sts", "STS", None, "Retrieve semantically similar text", True, "type"),
        ("my_clusters", "Clustering", None, "Identify the topic or theme of the given text", True, "type"),
        ("my_qa", "Reranking", None, "Given a query, retrieve documents that answer the query", False, "type"),
        # no task, no type: the retrieval default, queries only
        ("my_qa", None, None, "Given a query, retrieve documents that answer the query", False, "default"),
    ],
)  # fmt: skip
def test_resolve_instruction(task, task_type, row, instruction, documents, source):
    resolved = resolve_instruction(task, task_type, row)
    assert (resolved.instruction, resolved.documents, resolved.source) == (instruction, documents, source)
    assert resolved.prompt_for("anchor") == f"Instruct: {instruction} \n Query: "
    for column in ("positive", "negative_1", "negative_12"):
        assert resolved.prompt_for(column) == (f"Instruct: {instruction} \n Query: " if documents else "")
    assert resolved.prompt_for("label") == ""


def test_unknown_task_type_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task type 'Sts'; known task types: Retrieval, Reranking, .*STS"):
        resolve_instruction("x", "Sts")


@pytest.mark.parametrize(
    ("text", "instructed"),
    [
        ("Instruct: X \n Query: q", True),
        ("Instruct: two\nlines \n Query: q", True),
        ("Instruct: X \n Query: ", True),
        ("instruct: X \n Query: q", False),
        ("Instruct: X\nQuery: q", False),  # another model's template, not KaLM's
        ("q Instruct: X \n Query: q", False),
        ("", False),
    ],
)
def test_already_instructed_texts(text, instructed):
    import pyarrow as pa

    from kalm_st.instructions import instructed_mask, is_instructed

    assert is_instructed(text) is instructed
    assert instructed_mask(pa.array([text])).to_pylist() == [instructed]  # the Arrow check agrees with Python's


def test_column_prompts_no_instructions_and_already_instructed():
    from datasets import Dataset

    from kalm_st.instructions import column_prompts

    sts = "Instruct: Retrieve semantically similar text \n Query: "
    data = Dataset.from_dict({"anchor": [sts + "a"], "positive": ["b"], "negative_1": ["c"], "label": [[1.0, 0.0]]})
    assert column_prompts(data, "my_sts", "STS") == {"anchor": "", "positive": sts, "negative_1": sts}
    assert column_prompts(data, "my_sts", "STS", instructions=False) == {
        "anchor": "",
        "positive": "",
        "negative_1": "",
    }
    # rows picked by select / shuffle are checked in their order, not the underlying table's
    mixed = Dataset.from_dict({"anchor": [sts + "a", "b"], "positive": ["p", "q"]})
    assert column_prompts(mixed.select([0]), "my_sts", "STS")["anchor"] == ""
    assert column_prompts(mixed.select([1]), "my_sts", "STS")["anchor"] == sts
