"""Training data: one reader for every layout (:mod:`kalm_st.data.load`: task specs -> a validated, memory-mapped
``DatasetDict``; :mod:`~kalm_st.data.tasks`, :mod:`~kalm_st.data.shards`, :mod:`~kalm_st.data.readers`,
:mod:`~kalm_st.data.checks`), the writer (:mod:`~kalm_st.data.writing`) and the KaLM curation tools
(:mod:`~kalm_st.data.mining`, :mod:`~kalm_st.data.filtering`, :mod:`~kalm_st.data.labelling`,
:mod:`~kalm_st.data.teacher_scores`)."""

from __future__ import annotations

from kalm_st.data.checks import DataValidationError
from kalm_st.data.columns import detect_format, negative_columns, negative_columns_of
from kalm_st.data.filtering import FilterReport, filter_by_rank, positive_ranks
from kalm_st.data.labelling import label_examples
from kalm_st.data.load import (
    LoadOptions,
    build_training_prompts,
    load_tasks,
    load_training_data,
    validate_training_data,
)
from kalm_st.data.mining import mine_hard_negatives
from kalm_st.data.shards import read_table
from kalm_st.data.tasks import TaskSource
from kalm_st.data.teacher_scores import score_with_teacher, teacher_name
from kalm_st.data.writing import write_training_data

__all__ = [
    "DataValidationError",
    "FilterReport",
    "LoadOptions",
    "TaskSource",
    "build_training_prompts",
    "detect_format",
    "filter_by_rank",
    "label_examples",
    "load_tasks",
    "load_training_data",
    "mine_hard_negatives",
    "negative_columns",
    "negative_columns_of",
    "positive_ranks",
    "read_table",
    "score_with_teacher",
    "teacher_name",
    "validate_training_data",
    "write_training_data",
]
