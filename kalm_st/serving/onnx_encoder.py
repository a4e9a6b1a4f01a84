"""Serve an exported kalm-st model with ONNX Runtime: no torch, no transformers, no sentence-transformers.

:class:`ONNXEncoder` reads what ``kalm-st export MODEL --format onnx`` wrote (``MODEL/onnx/model.onnx``,
``model_int8.onnx``, the tokenizer and ``kalm_st_onnx.json``) and the model's prompt table
(``MODEL/config_sentence_transformers.json``), and mirrors ``SentenceTransformer.encode``: ``prompt + text``
tokenized as the model's tokenizer does it, batches sorted by length, ``truncate_dim`` applied after the model's own
normalisation, ``normalize_embeddings`` after that. It needs ``onnxruntime``, ``tokenizers``, ``numpy`` and
``tqdm`` (``pip install 'kalm-st[onnx]'``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kalm_st.io import read_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "kalm_st_onnx.json"
"""Written by the export next to the graphs: files, pooling, tokenizer settings, versions, measured parity."""


class ONNXEncoder:
    """Sentence embeddings from an exported kalm-st model, with the same API as ``SentenceTransformer.encode``.

    Args:
        model_path: The model folder (the one ``kalm-st export`` was run on), or the folder holding the graphs
            (``MODEL/onnx``, or the export's ``--output``).
        quantized: Use ``model_int8.onnx`` (written by ``--quantize int8``) instead of ``model.onnx``.
        file_name: An explicit graph file inside the ``onnx`` folder (overrides ``quantized``).
        truncate_dim: Matryoshka dimension to truncate to, like sentence-transformers' ``truncate_dim``.
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        intra_op_num_threads: onnxruntime threads (default: onnxruntime's choice, one per physical core).
        padding_side: ``"right"`` / ``"left"``; default the model tokenizer's.
        session_options: An ``onnxruntime.SessionOptions`` to start from (e.g. with spinning threads turned off
            when other work shares the CPU).

    Example::

        encoder = ONNXEncoder("my-kalm-model", quantized=True)
        queries = encoder.encode_query(["how do I reset my card PIN?"])
        documents = encoder.encode_document(["Reset your PIN in the app under Card > PIN."])
        scores = encoder.similarity(queries, documents)
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        quantized: bool = False,
        file_name: str | None = None,
        truncate_dim: int | None = None,
        providers: Sequence[str] | None = None,
        intra_op_num_threads: int | None = None,
        padding_side: str | None = None,
        session_options: Any = None,
    ) -> None:
        folder = Path(model_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"Model folder {str(folder)!r} does not exist.")
        # MODEL (the export's default layout MODEL/onnx) or the folder of the graphs itself.
        onnx_dir = folder if (folder / MANIFEST_NAME).is_file() else folder / "onnx"
        folder = folder.parent if onnx_dir == folder else folder
        manifest_path = onnx_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: {folder} has no kalm-st ONNX export. "
                f"Run `kalm-st export {folder} --format onnx` first."
            )
        self.model_path = folder
        self.manifest: dict[str, Any] = read_json(manifest_path)
        files = self.manifest.get("files", {})
        name = file_name or files.get("int8" if quantized else "float32")
        if name is None or not (onnx_dir / name).is_file():
            hint = " (export with `--quantize int8`)" if quantized and file_name is None else ""
            raise FileNotFoundError(f"ONNX graph {onnx_dir / (name or 'model_int8.onnx')} not found{hint}.")
        self.graph_path = onnx_dir / name

        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(
                f"ONNXEncoder needs onnxruntime and tokenizers ({error}): pip install 'kalm-st[onnx]'."
            ) from error

        options = session_options or onnxruntime.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        self.session = onnxruntime.InferenceSession(
            str(self.graph_path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        input_names = [i.name for i in self.session.get_inputs()]
        if input_names != ["input_ids", "attention_mask"]:
            raise ValueError(f"{self.graph_path}: inputs {input_names}, expected ['input_ids', 'attention_mask'].")

        tokenizer_settings = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer.from_file(str(onnx_dir / tokenizer_settings["file"]))
        self.max_seq_length: int | None = tokenizer_settings.get("max_length")
        self.padding_side = padding_side or tokenizer_settings.get("padding_side", "right")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}.")
        self.tokenizer.no_truncation()
        if self.max_seq_length is not None:
            self.tokenizer.enable_truncation(
                max_length=self.max_seq_length, direction=tokenizer_settings.get("truncation_side", "right")
            )
        self.tokenizer.enable_padding(
            direction=self.padding_side,
            pad_id=tokenizer_settings["pad_token_id"],
            pad_token=tokenizer_settings["pad_token"],
        )

        # The model's prompt table: the copy an export outside the model folder carries, else the model's own.
        st_config_path = next(
            (p for p in (onnx_dir / "config_sentence_transformers.json", folder / "config_sentence_transformers.json")
             if p.is_file()),
            None,
        )  # fmt: skip
        st_config = read_json(st_config_path) if st_config_path is not None else {}
        self.prompts: dict[str, str] = dict(st_config.get("prompts") or {})
        self.default_prompt_name: str | None = st_config.get("default_prompt_name")
        self.similarity_fn_name: str = st_config.get("similarity_fn_name") or "cosine"
        self.embedding_dimension: int = int(self.manifest["embedding_dimension"])
        if truncate_dim is not None and not 0 < truncate_dim <= self.embedding_dimension:
            raise ValueError(f"truncate_dim must be in 1..{self.embedding_dimension}, got {truncate_dim}.")
        self.truncate_dim = truncate_dim

    def __repr__(self) -> str:
        return (
            f"ONNXEncoder({str(self.graph_path)!r}, dim={self.get_embedding_dimension()}, "
            f"max_seq_length={self.max_seq_length}, prompts={len(self.prompts)})"
        )

    def get_embedding_dimension(self) -> int:
        """The output dimension, after ``truncate_dim``."""
        return self.truncate_dim or self.embedding_dimension

    def tokenize(self, texts: Sequence[str], prompt: str | None = None) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (int64, padded to the longest) for ``prompt + text``."""
        encodings = self.tokenizer.encode_batch([(prompt or "") + text for text in texts], add_special_tokens=True)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        # sentence-transformers' rule: an explicit prompt wins, then prompt_name, then default_prompt_name.
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(
                    f"Prompt name {prompt_name!r} not found in the model's prompts "
                    f"({len(self.prompts)} keys, e.g. {sorted(self.prompts)[:5]})."
                )
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return None

    def encode(
        self,
        sentences: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
    ) -> np.ndarray:
        """Embeddings of ``sentences`` (``(n, dim)`` float32; ``(dim,)`` for one string).

        Args:
            sentences: A text or a list of texts.
            prompt_name: A key of the model's prompt table (e.g. an MTEB task name, ``"query"``).
            prompt: An explicit prompt string (wins over ``prompt_name``).
            batch_size: Texts per onnxruntime call.
            show_progress_bar: A tqdm bar over batches; default on when logging is at INFO or DEBUG.
            normalize_embeddings: L2-normalise after truncation.
            truncate_dim: Overrides the encoder's ``truncate_dim`` for this call.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode() expects strings, but item {index} is {type(text).__name__}: {text!r:.80}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        dim = truncate_dim if truncate_dim is not None else self.truncate_dim
        if dim is not None and not 0 < dim <= self.embedding_dimension:
            raise ValueError(f"truncate_dim must be in 1..{self.embedding_dimension}, got {dim}.")
        resolved = self._resolve_prompt(prompt, prompt_name)
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
        if not texts:
            return np.zeros((0, dim or self.embedding_dimension), dtype=np.float32)

        from tqdm.auto import trange

        order = np.argsort([-len(text) for text in texts], kind="stable")  # longest first, as sentence-transformers
        outputs: list[np.ndarray] = []
        for start in trange(0, len(texts), batch_size, desc="Batches", disable=not show_progress_bar):
            batch = [texts[i] for i in order[start : start + batch_size]]
            (embeddings,) = self.session.run(["sentence_embedding"], self.tokenize(batch, resolved))
            outputs.append(embeddings)
        embeddings = np.concatenate(outputs)[np.argsort(order, kind="stable")]
        if dim is not None:
            embeddings = embeddings[:, :dim]
        if normalize_embeddings:
            embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        embeddings = embeddings.astype(np.float32, copy=False)
        return embeddings[0] if single else embeddings

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """:meth:`encode` with the ``"query"`` prompt unless ``prompt``/``prompt_name`` is given (ST's rule)."""
        if kwargs.get("prompt_name") is None and kwargs.get("prompt") is None and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """:meth:`encode` with the first of the ``"document"``, ``"passage"``, ``"corpus"`` prompts (ST's rule)."""
        if kwargs.get("prompt_name") is None and kwargs.get("prompt") is None:
            for name in ("document", "passage", "corpus"):
                if name in self.prompts:
                    kwargs["prompt_name"] = name
                    break
        return self.encode(sentences, **kwargs)

    def similarity(self, embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
        """Cosine (or dot, per the model's ``similarity_fn_name``) similarity matrix."""
        a, b = np.atleast_2d(embeddings1), np.atleast_2d(embeddings2)
        if self.similarity_fn_name == "dot":
            return a @ b.T
        if self.similarity_fn_name != "cosine":
            raise ValueError(f"similarity_fn_name {self.similarity_fn_name!r} is not supported by ONNXEncoder.")
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return a @ b.T


__all__ = ["MANIFEST_NAME", "ONNXEncoder"]
