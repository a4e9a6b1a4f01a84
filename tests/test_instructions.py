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
