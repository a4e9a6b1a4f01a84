"""The push: a model saved with kalm-st's card (:mod:`kalm_st.evaluation.card`) and uploaded with
``huggingface_hub``.

The token comes only from ``HF_TOKEN`` or ``hf auth login`` (``HfApi()`` reads them); it is never a parameter,
never logged. Offline or unauthenticated use raises :class:`HubPushError` with what to do.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kalm_st.evaluation.card import LocalScore, build_model_card, eval_results_from_dir, find_training_configs

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


class HubPushError(RuntimeError):
    """A push that cannot happen (offline, not logged in, no permission), with what to do about it."""


@dataclass
class PushResult:
    """What :func:`push_model` uploaded (or, with ``dry_run``, would upload)."""

    repo_id: str
    files: list[str]
    card: str
    url: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Push.


def push_model(
    model: str | os.PathLike[str] | SentenceTransformer,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    results_dir: str | os.PathLike[str] | None = None,
    results_model_name: str | None = None,
    training_configs: Sequence[Mapping[str, Any]] | None = None,
    license: str = "apache-2.0",
    languages: Iterable[str] | None = None,
    commit_message: str = "Upload kalm-st model",
) -> PushResult:
    """Save ``model`` with a kalm-st model card and upload it to ``repo_id`` (or only list the files: ``dry_run``).

    Args:
        model: A model folder or a loaded model.
        repo_id: ``org/name`` on the Hub.
        private: Create the repository private.
        dry_run: Build everything, upload nothing (no network, no token needed).
        results_dir: An evaluation folder (:func:`kalm_st.evaluation.evaluate_model`'s ``output_dir``, or a recipe's
            eval step folder) holding this model's results (found by its weights fingerprint); full MTEB tasks go
            into the card's ``model-index``, subsets into the body only. A folder without them is an error.
        results_model_name: The results' ``org/name`` (instead of matching the fingerprint).
        languages: The card's ``language`` codes (none listed by default).
        training_configs: Resolved stage configs; default those found next to the model folder.
        license: SPDX id for the card.
        commit_message: Commit message of the upload.

    Raises:
        HubPushError: offline, unreachable, not logged in, or no permission (the token is never shown).
        FileNotFoundError: ``results_dir`` does not exist or holds no results of this model.
    """
    from kalm_st.evaluation.run import model_fingerprint
    from kalm_st.model_source import resolve_model

    model_dir = None
    if isinstance(model, (str, os.PathLike)):
        model_dir = Path(os.fspath(model))
        model = resolve_model(model_dir, hub="embedder")
    st_model: SentenceTransformer = model  # type: ignore[assignment]
    if training_configs is None:
        training_configs = find_training_configs(model_dir) if model_dir is not None else []
    local_scores: list[LocalScore] = []
    results = []
    if results_dir is not None:
        fingerprint = None if results_model_name else model_fingerprint(st_model)
        results = eval_results_from_dir(
            results_dir, results_model_name, fingerprint=fingerprint, local_scores=local_scores
        )
    card = build_model_card(
        st_model,
        repo_id,
        eval_results=results,
        training_configs=training_configs,
        license=license,
        languages=languages,
        local_scores=local_scores,
    )

    with tempfile.TemporaryDirectory(prefix="kalm-st-push-") as folder:
        st_model.save(folder, create_model_card=False)
        card.save(Path(folder) / "README.md")
        files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        if dry_run:
            return PushResult(repo_id=repo_id, files=files, card=str(card))
        url = _upload(folder, repo_id, private=private, commit_message=commit_message)
    logger.info("Pushed %d files to %s", len(files), repo_id)
    return PushResult(repo_id=repo_id, files=files, card=str(card), url=url)


def _upload(folder: str, repo_id: str, *, private: bool, commit_message: str) -> str:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    try:
        api = huggingface_hub.HfApi()  # token from HF_TOKEN or `hf auth login`, never passed around
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    except OfflineModeIsEnabled:
        raise HubPushError(
            "The Hugging Face Hub is offline (HF_HUB_OFFLINE is set): unset it to push, or use --dry-run."
        ) from None
    except LocalTokenNotFoundError:
        raise HubPushError("Not logged in to the Hugging Face Hub: set HF_TOKEN or run `hf auth login`.") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise HubPushError(
                f"The Hub refused the push to {repo_id!r} (HTTP {status}): check that HF_TOKEN / `hf auth login` "
                "is valid and has write access."
            ) from None
        raise HubPushError(f"The push to {repo_id!r} failed: HTTP {status}.") from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise HubPushError(
            f"Cannot reach the Hugging Face Hub to push {repo_id!r} ({type(error).__name__}): check the network "
            "(or HF_ENDPOINT), or use --dry-run to build the folder and card offline."
        ) from None
    return str(getattr(commit, "commit_url", commit))


_NETWORK_ERRORS = frozenset({"TransportError", "RequestError", "ConnectionError", "TimeoutException"})


def _is_network_error(error: BaseException) -> bool:
    """A failure to reach the Hub (httpx's ``TransportError`` family, requests' and Python's connection errors)."""
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in _NETWORK_ERRORS for cls in type(error).__mro__
    )


__all__ = ["HubPushError", "PushResult", "push_model"]
