"""The path after training, as a new user walks it (issue 26): eval, model card, push, export and the permissions of
saved files. Each test pins one point; the last one walks the whole path from a clean clone's point of view:
a recipe-trained tiny model -> ``kalm-st eval`` of two models into one folder -> ``kalm-st export`` with a relative
path and int8 -> ``kalm-st push --dry-run`` with the recipe's eval folder and with the eval folder.

Only the Hub's network is faked (an endpoint nothing listens on); mteb, sentence-transformers and onnxruntime run.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml

from kalm_st.cli import main
from kalm_st.data import write_training_data
from kalm_st.evaluation import HubPushError, evaluate_model, push_model
from kalm_st.io import atomic_directory, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_EVAL = REPO_ROOT / "data" / "tiny" / "tiny_eval"  # 100 STS-B dev pairs, laid out as stsb/test.csv
INT8_FLOOR = ["--int8-min-cosine", "0.5"]
"""The random tiny model's int8 parity depends on the CPU's int8 kernels (0.96 on some): the floors are
tests/serving/test_onnx.py's business, these tests are about paths and files."""
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def _perturbed(model):
    """Another model: the same architecture with every weight nudged (a different training run, say)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return other


def _error_line(err: str) -> str:
    """The one error line a command ends with (progress bars may come before it), after checking there is no
    traceback."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("kalm-st "), err
    return line


def _printed_scores(text: str) -> dict[str, float]:
    """``task<TAB>score`` lines of ``kalm-st eval``'s stdout."""
    rows = [line.split("\t") for line in text.splitlines() if line.count("\t") == 1]
    return {task: float(score) for task, score in rows}


# ----------------------------------------------------------------------------------------------------------------
# Point 1: a second model evaluated into the same folder gets its own scores, never the first one's.


def test_two_models_in_one_output_folder_get_their_own_scores(tiny_model, tmp_path, capsys):
    first, second = tmp_path / "soup" / "final", tmp_path / "pretrain" / "final"
    tiny_model.save(str(first))
    _perturbed(tiny_model).save(str(second))
    args = ["--tasks", "STSBenchmark", "--data-dir", str(TINY_EVAL), "--no-report"]

    def evaluate(model: Path, output: Path) -> tuple[float, str]:
        assert main(["eval", str(model), "--output", str(output), *args]) == 0
        captured = capsys.readouterr()
        return _printed_scores(captured.out)["STSBenchmark"], captured.err

    alone = {model: evaluate(model, tmp_path / f"alone-{model.parent.name}")[0] for model in (first, second)}
    assert alone[first] != alone[second]  # reference: each model alone in a fresh folder
    shared = tmp_path / "ev"
    assert evaluate(first, shared)[0] == alone[first]
    assert evaluate(second, shared)[0] == alone[second]  # not the first model's score
    assert sorted(p.name for p in (shared / "results").iterdir()) == ["local__pretrain-final", "local__soup-final"]
    # The same model again: its finished task is reused, and the user is told so.
    score, err = evaluate(first, shared)
    assert score == alone[first] and "reused from an earlier run of this same model" in err


def test_a_results_folder_of_another_model_is_refused(tiny_model, tmp_path):
    kwargs = dict(output_dir=tmp_path / "ev", data_dir=TINY_EVAL, model_name="me/model", revision="v1")
    evaluate_model(tiny_model, ["STSBenchmark"], **kwargs)
    with pytest.raises(ValueError, match="holds the results of another model"):
        evaluate_model(_perturbed(tiny_model), ["STSBenchmark"], **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Point 2: saved files get the modes the umask gives a plain open() / mkdir().


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix() or ".": stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_saved_files_follow_the_umask(tiny_model, tmp_path, umask):
    expected_file, expected_folder = {0o022: (0o644, 0o755), 0o027: (0o640, 0o750)}[umask]
    tiny_model.save(str(tmp_path / "model"))
    from datasets import Dataset, DatasetDict

    data = DatasetDict({"t": Dataset.from_dict({"anchor": ["a", "b"], "positive": ["c", "d"]})})
    for name in ("data.parquet", "data.jsonl", "data.csv"):
        write_training_data(data, tmp_path / "curated" / name)
    write_json_atomic(tmp_path / "curated" / "x.json", {"a": 1})
    with atomic_directory(tmp_path / "folder") as folder:
        (folder / "inner").mkdir()
        (folder / "inner" / "file.txt").write_text("x")
    for root in (tmp_path / "model", tmp_path / "curated", tmp_path / "folder"):
        for name, mode in _modes(root).items():
            is_dir = (root / name).is_dir()
            assert mode == (expected_folder if is_dir else expected_file), (root.name, name, oct(mode))


def test_onnx_export_files_follow_the_umask(tiny_model, tmp_path, monkeypatch):
    previous = os.umask(0o022)
    try:
        tiny_model.save(str(tmp_path / "m"))
        monkeypatch.chdir(tmp_path)
        assert main(["export", "m", "--quantize", "int8", *INT8_FLOOR]) == 0
        modes = _modes(tmp_path / "m" / "onnx")
    finally:
        os.umask(previous)
    assert modes.pop(".") == 0o755 and set(modes.values()) == {0o644}, modes


# ----------------------------------------------------------------------------------------------------------------
# Point 3: `kalm-st export RELATIVE --quantize int8`, as the card and docs/serving.md print it.


def test_export_int8_with_a_relative_path(tiny_model, tmp_path, monkeypatch, capsys):
    (tmp_path / "outputs").mkdir()
    tiny_model.save(str(tmp_path / "outputs" / "kalm-v2"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "outputs/kalm-v2", "--format", "onnx", "--quantize", "int8", *INT8_FLOOR]) == 0
    assert Path.cwd() == tmp_path  # the working directory is never changed
    onnx = tmp_path / "outputs" / "kalm-v2" / "onnx"
    assert (onnx / "model.onnx").is_file() and (onnx / "model_int8.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # no scratch files left behind
    assert "model_int8.onnx (int8" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Point 4: the README's `kalm-st eval MODEL --tasks local` from a clean clone (no ../shared, no matplotlib).


def test_readme_eval_command_from_a_clean_clone(tiny_model, tmp_path, monkeypatch, capsys, caplog):
    from kalm_st.evaluation import tasks

    clone_data = tmp_path / "clone-data"  # the clone's data/ (no sick/: its licence is non-commercial), trimmed
    for folder, files in {
        "stsb": ["test.csv"],
        "trecqa": ["test.csv"],
        "banking77": ["train.csv", "test.csv"],
    }.items():
        for name in files:
            with (REPO_ROOT / "data" / folder / name).open(encoding="utf8", newline="") as handle:
                records = list(csv.reader(handle))
            keep = records[:120] if folder != "banking77" else records[:1] + records[1::8][:400]
            (clone_data / folder).mkdir(parents=True, exist_ok=True)
            with (clone_data / folder / name).open("w", encoding="utf8", newline="") as handle:
                csv.writer(handle).writerows(keep)
    (clone_data / "banking77" / "categories.json").write_text(
        (REPO_ROOT / "data/banking77/categories.json").read_text()
    )
    monkeypatch.setattr(tasks, "BUNDLED_DATA_DIR", clone_data)
    monkeypatch.setattr(tasks, "SHARED_DATA_DIR", tmp_path / "no-shared")
    monkeypatch.delenv(tasks.DATA_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: the README installs .[assets] only
    tiny_model.save(str(tmp_path / "kalm-v2"))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "kalm-v2", "--tasks", "local"]) == 0
    out = capsys.readouterr()
    scores = _printed_scores(out.out)
    assert sorted(scores) == ["Banking77Classification", "STSBenchmark", "TrecQAReranking", "TrecQARetrieval"]
    assert "'local' skips SICK-R" in caplog.text
    report = (tmp_path / "eval-results" / "report.md").read_text()
    assert "scores.png" not in report and not (tmp_path / "eval-results" / "scores.png").exists()
    assert "pip install 'kalm-st[plot]'" in out.err


# ----------------------------------------------------------------------------------------------------------------
# Point 5: the card's results and provenance.


def test_card_never_labels_a_subset_as_the_mteb_task(tiny_model, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "m"))
    assert main(["eval", str(tmp_path / "m"), "--tasks", "STSBenchmark", "--data-dir", str(TINY_EVAL),
                 "--output", str(tmp_path / "ev"), "--no-report"]) == 0  # fmt: skip
    score = _printed_scores(capsys.readouterr().out)["STSBenchmark"]
    result = push_model(tmp_path / "m", "me/m", dry_run=True, results_dir=tmp_path / "ev")
    meta = yaml.safe_load(result.card.split("---")[1])
    assert "model-index" not in meta  # 100 dev pairs are not MTEB's STSBenchmark test (1,379 pairs)
    assert f"| STSBenchmark | subset: 100 of 1379 test samples | cosine_spearman | {score:.2f} |" in result.card
    assert "language" not in meta  # not claimed without being told


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_push_results_folder_without_results_is_an_error(tiny_model, tmp_path, capsys, where):
    tiny_model.save(str(tmp_path / "m"))
    results = tmp_path / "ev"
    if where == "empty":
        results.mkdir()
    argv = ["push", str(tmp_path / "m"), "me/m", "--dry-run", "--results", str(results)]
    assert main(argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert str(results) in err


def test_push_results_of_another_model_are_refused(tiny_model, tmp_path):
    evaluate_model(_perturbed(tiny_model), ["STSBenchmark"], output_dir=tmp_path / "ev", data_dir=TINY_EVAL)
    with pytest.raises(FileNotFoundError, match="None of the results .* are of this model"):
        push_model(tiny_model, "me/m", dry_run=True, results_dir=tmp_path / "ev")


# ----------------------------------------------------------------------------------------------------------------
# Point 6: no network.


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """Online mode with the Hub's endpoint on a port nothing listens on (only the network is faked)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("HF_TOKEN", "hf_notarealtoken")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)


def test_push_without_network_is_one_line(tiny_model, tmp_path, hub_unreachable, capsys):
    tiny_model.save(str(tmp_path / "m"))
    with pytest.raises(HubPushError, match="Cannot reach the Hugging Face Hub"):
        push_model(tmp_path / "m", "me/m")
    assert main(["push", str(tmp_path / "m"), "me/m"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "Cannot reach the Hugging Face Hub" in err and "--dry-run" in err


def test_build_model_from_the_hub_without_network_fails_fast(hub_unreachable):
    from kalm_st import build_model

    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        build_model("Qwen/Qwen2-0.5B")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "Qwen/Qwen2-0.5B" in message and "cannot be reached" in message


# ----------------------------------------------------------------------------------------------------------------
# Point 7: curation commands check the output path and the model before any work.


def test_curation_checks_its_output_path_before_loading_anything(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n")
    start = time.perf_counter()
    argv = ["mine", str(rows), "-o", "/proc/kalm-st-test/x.jsonl", "--model", str(tmp_path / "no-model-loaded")]
    assert main(argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert "/proc/kalm-st-test/x.jsonl" in err and ".tmp" not in err
    assert time.perf_counter() - start < 5


def test_a_stage_folder_given_as_model_names_its_model(tiny_model, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "outputs" / "stage" / "final"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n")
    stage = str(tmp_path / "outputs" / "stage")
    assert main(["mine", str(rows), "-o", str(tmp_path / "o.jsonl"), "--model", stage]) == 2
    err = capsys.readouterr().err
    assert f"holds a model in {str(tmp_path / 'outputs' / 'stage' / 'final')!r}" in err


def test_teacher_caches_go_under_the_output_folder(minilm_dir, tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"anchor": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"}) + "\n"
                            for i in range(4)))  # fmt: skip
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "out" / "scored.jsonl"
    assert main(["teacher-score", str(rows), "-o", str(out), "--model", str(minilm_dir), "--no-instructions"]) == 0
    assert list((tmp_path / "cwd").iterdir()) == []
    assert (tmp_path / "out" / ".kalm_cache" / "teacher_scores").is_dir()


# ----------------------------------------------------------------------------------------------------------------
# The walk-through.

WALK_RECIPE = """
output_dir: {work}
seed: 0
steps:
  - name: stage1
    kind: train
    config: training/configs/tiny_smoke.yaml
    set:
      model: {{init_from: "builtin:tiny-qwen2", max_seq_length: 128}}
      args: {{max_steps: 2, save_steps: 2}}
  - name: stage2
    kind: train
    config: training/configs/tiny_smoke.yaml
    set:
      model: {{init_from: "@stage1", max_seq_length: 128}}
      args: {{max_steps: 2, save_steps: 2, seed: 1}}
  - name: soup
    kind: soup
    models: ["@stage1", "@stage2"]
    output: {kalm}
  - name: trained                  # the quickstart's held-out rows: 200 STS-B test pairs, 20 TrecQA questions
    kind: eval
    model: "@soup"
    tasks: [STSBenchmark, TrecQAReranking]
    data_dir: data/quickstart/eval
"""


def test_walk_through_from_a_trained_model_to_the_hub(tmp_path, monkeypatch, capsys):
    previous = os.umask(0o022)
    try:
        _walk(tmp_path, monkeypatch, capsys)
    finally:
        os.umask(previous)


def _walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work, kalm = tmp_path / "outputs" / "walk", tmp_path / "kalm-v2"
    recipe = tmp_path / "walk.yaml"
    recipe.write_text(textwrap.dedent(WALK_RECIPE.format(work=work, kalm=kalm)))
    monkeypatch.chdir(REPO_ROOT)  # a recipe names the bundled data relative to the clone's root
    assert main(["run", str(recipe)]) == 0
    capsys.readouterr()

    # The final folder is readable by others (umask 022) and carries kalm-st's card, not the automatic one.
    assert stat.S_IMODE(kalm.stat().st_mode) == 0o755
    assert stat.S_IMODE((kalm / "model.safetensors").stat().st_mode) == 0o644
    card = (kalm / "README.md").read_text()
    assert "sentence_transformers_model_id" not in card and "were not found" not in card
    assert "bidirectional Qwen2 decoder" in card and "### Stage 1: finetune" in card and "Model soup" in card

    # Two models into one output folder, from the user's folder, with relative paths.
    monkeypatch.chdir(tmp_path)
    stage1 = "outputs/walk/stage1/final"
    printed = {}
    for model in ("kalm-v2", stage1):
        assert main(["eval", model, "--tasks", "STSBenchmark", "--output", "ev", "--no-report"]) == 0
        printed[model] = _printed_scores(capsys.readouterr().out)["STSBenchmark"]
    assert printed["kalm-v2"] != printed[stage1]

    # Export with a relative path and int8.
    assert main(["export", "kalm-v2", "--quantize", "int8", *INT8_FLOOR]) == 0
    assert (kalm / "onnx" / "model_int8.onnx").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "ev", "kalm-v2", "outputs", "walk.yaml",
    ]  # fmt: skip
    capsys.readouterr()

    # Push --dry-run with the recipe's eval folder: 200 of 1,379 STS-B pairs and TrecQA are no MTEB results.
    assert main(["push", "kalm-v2", "me/kalm-v2", "--dry-run", "--results", "outputs/walk/trained"]) == 0
    dry = capsys.readouterr().out
    meta = yaml.safe_load(dry.split("---")[1])
    assert "model-index" not in meta
    recipe_scores = json.loads((work / "trained" / "scores.json").read_text())
    assert (
        f"| STSBenchmark | subset: 200 of 1379 test samples | cosine_spearman | {recipe_scores['STSBenchmark']:.2f} |"
        in dry
    )
    assert "| TrecQAReranking | kalm-st offline task, not in MTEB | map_at_1000 |" in dry

    # Push --dry-run with the eval folder of the whole STS-B test: the model-index holds exactly that task.
    assert main(["push", "kalm-v2", "me/kalm-v2", "--dry-run", "--results", "ev"]) == 0
    meta = yaml.safe_load(capsys.readouterr().out.split("---")[1])
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["dataset"]["name"] == "MTEB STSBenchmark (default)"
    assert result["dataset"]["revision"] == "b0fddb56ed78048fa8b90373c8a3cfc37b684831"  # mteb's STSBenchmark data
    assert result["metrics"][0]["value"] == round(printed["kalm-v2"], 2)  # kalm-v2's, not stage 1's


# ----------------------------------------------------------------------------------------------------------------
# Point 8: the docs a user reads hold.


def test_readme_names_only_what_a_clone_has_and_every_command():
    import re

    from kalm_st.cli import build_parser

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf8")
    assert "METHOD.md" not in readme and "../shared" not in readme
    for doc in ("serving.md", "ablation.md", "instructions.md", "quickstart.md"):
        assert "../shared" not in (REPO_ROOT / "docs" / doc).read_text(encoding="utf8"), doc
    table = readme[readme.index("## CLI") : readme.index("## How it maps")]
    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse's registry
    for name in commands:
        assert re.search(rf"(kalm-st |/ ){re.escape(name)}\b", table), name


def test_instructions_doc_lists_the_types_a_stage_accepts():
    import typing

    from kalm_st.recipe.config import TaskType

    text = (REPO_ROOT / "docs" / "instructions.md").read_text(encoding="utf8")
    sentence = text[text.index("Stage YAMLs accept") :].split(";")[0]
    assert [m.strip(" `") for m in sentence.split(":", 1)[1].replace("\n", " ").split(", ")] == list(
        typing.get_args(TaskType)
    )


def test_focal_info_nce_with_gamma_0_is_mnrl_at_the_readmes_temperature():
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from kalm_st import testing
    from kalm_st.losses import FocalInfoNCE

    model = SentenceTransformer(str(testing.minilm_dir()), device="cpu")
    features = [model.tokenize(["a cat", "a dog", "rain"]), model.tokenize(["kitten", "puppy", "storm"])]
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf8")
    assert "`gamma=0, temperature=0.05` is `MultipleNegativesRankingLoss` at its default `scale=20`" in readme
    with torch.no_grad():
        ours = FocalInfoNCE(model, gamma=0.0, temperature=0.05)(features, None)
        reference = MultipleNegativesRankingLoss(model)(features, None)  # scale 20 = 1 / 0.05
        default = FocalInfoNCE(model, gamma=0.0)(features, None)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(default, reference, atol=1e-3)  # the default temperature is another loss


# ----------------------------------------------------------------------------------------------------------------
# Point 9 (part): what a user sees during an evaluation.


def test_evaluating_a_local_task_does_not_warn_that_it_is_superseded(tiny_model, tmp_path, caplog):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_model(tiny_model, ["STSBenchmark"], output_dir=tmp_path / "ev", data_dir=TINY_EVAL)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert not [m for m in messages if "superseded" in m], messages


# ----------------------------------------------------------------------------------------------------------------
# Card gaps: `kalm-st train` alone writes kalm-st's card, with the data (sources, rows) and the instruction table.


def test_kalm_st_train_writes_kalm_sts_card_with_data_rows_and_instructions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)  # the stage file names the bundled data relative to the clone's root
    out = tmp_path / "stage"
    argv = ["train", "training/configs/tiny_smoke.yaml", "--set", f"output_dir={out}", "--set", "args.max_steps=1"]
    assert main(argv) == 0, capsys.readouterr().err
    card = (out / "final" / "README.md").read_text(encoding="utf8")
    # sentence-transformers' automatic card (placeholder model id, "Unknown" base model) is replaced
    assert "sentence_transformers_model_id" not in card and "### Stage 1: finetune" in card
    # the data table: task, type, source and the rows trained on (the file's 64 lines, none dropped)
    with (REPO_ROOT / "data" / "tiny" / "tiny_train.jsonl").open(encoding="utf8") as handle:
        lines = sum(1 for line in handle if line.strip())
    assert f"  | STSBenchmark | STS | `data/tiny/tiny_train.jsonl` | {lines} |" in card
    # the instruction table: an STS task puts KaLM's symmetric instruction on both sides (METHOD.md §3)
    sts = r"`Instruct: Retrieve semantically similar text \n Query: `"
    assert "## Instructions used in training" in card
    assert any(
        row.startswith("| STSBenchmark | anchor, positive") and row.endswith(f"| {sts} |") for row in card.splitlines()
    )
