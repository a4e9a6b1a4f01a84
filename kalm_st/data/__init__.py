"""Training data: the file format and its validation (:mod:`kalm_st.data.formats`), the sources and the KaLM / FlagEmbedding / F2LLM formats
(:mod:`kalm_st.data.sources`) and the KaLM curation tools
(:mod:`~kalm_st.data.mining`, :mod:`~kalm_st.data.filtering`, :mod:`~kalm_st.data.labelling`,
:mod:`~kalm_st.data.teacher_scores`)."""

from __future__ import annotations

from kalm_st.data.filtering import FilterReport, filter_by_rank, positive_ranks
from kalm_st.data.formats import (
    DataValidationError,
    build_training_prompts,
    load_training_data,
    negative_columns,
    negative_columns_of,
    normalize_dataset,
    read_table,
    validate_training_data,
    write_training_data,
)
from kalm_st.data.labelling import label_examples
from kalm_st.data.mining import mine_hard_negatives
from kalm_st.data.sources import TaskSource, convert_pairs, detect_format, open_source
from kalm_st.data.teacher_scores import score_with_teacher, teacher_name

__all__ = [
    "DataValidationError",
    "FilterReport",
    "TaskSource",
    "build_training_prompts",
    "convert_pairs",
    "detect_format",
    "filter_by_rank",
    "label_examples",
    "load_training_data",
    "mine_hard_negatives",
    "negative_columns",
    "negative_columns_of",
    "normalize_dataset",
    "open_source",
    "positive_ranks",
    "read_table",
    "score_with_teacher",
    "teacher_name",
    "validate_training_data",
    "write_training_data",
]
