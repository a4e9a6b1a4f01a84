"""Training data: the file format and its validation (:mod:`kalm_st.data.formats`) and the KaLM curation tools
(:mod:`kalm_st.data.curation`: hard-negative mining, ranking-consistency filtering, example-based labelling, teacher
scores)."""

from __future__ import annotations

from kalm_st.data.curation import (
    FilterReport,
    filter_by_rank,
    label_examples,
    mine_hard_negatives,
    positive_ranks,
    score_with_teacher,
    teacher_name,
)
from kalm_st.data.formats import (
    DataValidationError,
    build_training_prompts,
    load_training_data,
    negative_columns,
    normalize_dataset,
    validate_training_data,
    write_training_data,
)

__all__ = [
    "DataValidationError",
    "FilterReport",
    "build_training_prompts",
    "filter_by_rank",
    "label_examples",
    "load_training_data",
    "mine_hard_negatives",
    "negative_columns",
    "normalize_dataset",
    "positive_ranks",
    "score_with_teacher",
    "teacher_name",
    "validate_training_data",
    "write_training_data",
]
