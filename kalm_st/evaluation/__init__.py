"""MTEB evaluation and publishing for kalm-st models.

- :func:`evaluate_model`: ``mteb.evaluate`` with the KaLM instruction table per task and side, results in mteb's
  layout (resumable);
- :mod:`~kalm_st.evaluation.tasks`: offline tasks on real data (``STSBenchmark``, ``SICK-R``,
  ``Banking77Classification``, ``TrecQAReranking``, ``TrecQARetrieval``; ``"local"`` = all);
- :mod:`~kalm_st.evaluation.report`: markdown table, bar chart, Matryoshka curves;
- :mod:`~kalm_st.evaluation.meta`: mteb ``ModelMeta`` and a results folder for the results repository;
- :mod:`~kalm_st.evaluation.card`: the model card; :mod:`~kalm_st.evaluation.hub`: the push.
"""

from __future__ import annotations

from kalm_st.evaluation.card import build_model_card
from kalm_st.evaluation.hub import HubPushError, PushResult, push_model
from kalm_st.evaluation.meta import build_model_meta, export_results_folder
from kalm_st.evaluation.report import PUBLISHED_SCORES, bar_chart, markdown_table, read_scores, write_report
from kalm_st.evaluation.run import EvaluationRun, InstructedEncoder, evaluate_model, resolve_prompts
from kalm_st.evaluation.tasks import LOCAL_TASKS, local_tasks, resolve_tasks

__all__ = [
    "LOCAL_TASKS",
    "PUBLISHED_SCORES",
    "EvaluationRun",
    "HubPushError",
    "InstructedEncoder",
    "PushResult",
    "bar_chart",
    "build_model_card",
    "build_model_meta",
    "evaluate_model",
    "export_results_folder",
    "local_tasks",
    "markdown_table",
    "push_model",
    "read_scores",
    "resolve_prompts",
    "resolve_tasks",
    "write_report",
]
