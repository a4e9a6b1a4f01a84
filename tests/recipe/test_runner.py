"""``kalm-st run``: the tiny twin of the paper's recipe end to end, skips, re-runs of changed steps and their
dependents, resume after SIGKILL in each step kind (bit-identical weights), and bad recipes caught by ``--dry-run``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kalm_st.cli import main
from kalm_st.recipe.config import ConfigError
from kalm_st.recipe.recipe import RecipeError, load_recipe, recipe_from_dict
from kalm_st.recipe.runner import MANIFEST, check_recipe, run_recipe

from .conftest import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "training" / "recipes").glob("*.yaml"))
TINY_TWIN = REPO_ROOT / "training" / "recipes" / "kalm_v2_tiny.yaml"


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Recipes name their data relative to the clone's root, as users run them."""
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_dry_runs_offline(path: Path, in_repo: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", str(path), "--dry-run", "--set", f"output_dir={tmp_path / 'out'}"]) == 0, capsys.readouterr()
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_tiny_twin_end_to_end_skip_and_rerun_of_a_changed_step(in_repo: Path, tmp_path: Path) -> None:
    out = f"output_dir={tmp_path / 'run'}"
    recipe = load_recipe(TINY_TWIN, [out])
    first = run_recipe(recipe)
    names = [step.name for step in recipe.steps]
    assert first.status == dict.fromkeys(names, "ran")
    evaluate = json.loads((tmp_path / "run" / "evaluate" / MANIFEST).read_text())
    assert math.isfinite(evaluate["summary"]["scores"]["STSBenchmark"])
    for name in names:
        manifest = json.loads((tmp_path / "run" / name / MANIFEST).read_text())
        assert {"fingerprint", "config", "inputs", "versions", "seconds", "summary"} <= set(manifest)
        assert manifest["versions"]["sentence-transformers"]
    # Curation outputs feed training: stage-2 rows carry the 3 mined / labelled negatives, stage-3 rows teacher scores.
    teacher = run_rows(tmp_path / "run" / "teacher" / "data.parquet")
    assert {"stsb", "Banking77Classification"} == set(teacher["task"])  # stsb: the KaLM-layout sub-folder
    assert all(len(label) == 4 for label in teacher["label"])

    again = run_recipe(load_recipe(TINY_TWIN, [out]))
    assert again.status == dict.fromkeys(names, "skipped")

    changed = run_recipe(load_recipe(TINY_TWIN, [out, "teacher.batch_size=16"]))
    rerun = {"teacher", "distill", "evaluate"}  # the changed step and every step that reads it, directly or not
    assert changed.status == {name: "ran" if name in rerun else "skipped" for name in names}


def run_rows(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


# ----------------------------------------------------------------------------------------------------------------------
# SIGKILL in each step kind, then a re-run: the same final weights as an uninterrupted run.

_KILL_RECIPE = """
output_dir: {out}
steps:
  - name: first
    kind: train
    config: training/configs/tiny_smoke.yaml
    set:
      model: {{max_seq_length: 32}}
      loss: {{kwargs: {{hard_negative_mixing: null}}}}
      args: {{max_steps: 4, per_device_train_batch_size: 4, save_steps: 2, logging_steps: 1}}
  - name: mine
    kind: mine
    model: "@first"
    data: data/tiny/tiny_train.jsonl
    instructions: false
    range_min: 2
    range_max: 16
    num_negatives: 3
  - name: teacher
    kind: teacher-score
    teacher: "@first"
    data: "@mine"
    instructions: false
  - name: second
    kind: train
    config: training/configs/tiny_smoke.yaml
    set:
      model: {{init_from: "@first", max_seq_length: 32}}
      loss: {{kwargs: {{hard_negative_mixing: null}}}}
      data: {{tasks: {{STSBenchmark: null, tiny_train: {{path: "@teacher", type: STS}}}}}}
      args: {{max_steps: 4, per_device_train_batch_size: 4, save_steps: 2, logging_steps: 1}}
  - name: soup
    kind: soup
    models: ["@first", "@second"]
"""


def _start(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread: the same reductions every run
    command = [sys.executable, "-m", "kalm_st.cli", "run", str(recipe)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, ready: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {ready} appeared: {process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{ready} did not appear within {timeout} s")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def test_sigkill_in_each_step_kind_then_rerun_gives_the_same_weights(tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference.yaml", tmp_path / "killed.yaml"
    reference.write_text(_KILL_RECIPE.format(out=tmp_path / "ref"))
    killed.write_text(_KILL_RECIPE.format(out=tmp_path / "run"))
    uninterrupted = _start(reference)  # side by side with the killed runs (each single-threaded)
    run = tmp_path / "run"
    kill_points = [
        run / "first" / "checkpoint-2" / "trainer_state.json",  # train: after its first complete checkpoint
        run / "mine" / "running.json",  # mine
        run / "teacher" / "running.json",  # teacher-score
        run / "soup" / "running.json",  # soup
    ]
    for ready in kill_points:
        _kill_when(_start(killed), ready)
    final = _start(killed)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-3000:]
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read().decode()[-3000:]
    a = load_file(str(tmp_path / "ref" / "soup" / "final" / "model.safetensors"))
    b = load_file(str(run / "soup" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    first = json.loads((run / "first" / MANIFEST).read_text())
    assert first["summary"]["resumed"] is True  # training continued from checkpoint-2


# ----------------------------------------------------------------------------------------------------------------------
# Bad recipes: one named error each, before any compute.


def _recipe(steps: str, tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nsteps:\n" + textwrap.indent(textwrap.dedent(steps), "  "))
    return path


TRAIN = """
- name: first
  kind: train
  config: training/configs/tiny_smoke.yaml
"""


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("- {name: a, kind: distil}\n", r"steps\[0\] \(a\): unknown step kind 'distil' \(kinds: train, mine"),
        (
            TRAIN + "- {name: b, kind: soup, models: ['@first', '@stage9']}\n",
            r"step 'b': '@stage9' names no step of the recipe",
        ),
        (
            "- {name: a, kind: soup, models: ['@b', x]}\n- {name: b, kind: soup, models: ['@a', y]}\n",
            r"step 'a': '@b' makes a cycle",
        ),
        (
            "- {name: a, kind: label, data: nowhere/labels.csv, task: T}\n",
            r"step 'a': input 'nowhere/labels.csv' does not exist",
        ),
        (
            "- {name: a, kind: label, data: data/tiny/tiny_banking77.csv, task: T, output: same.parquet}\n"
            "- {name: b, kind: label, data: data/tiny/tiny_banking77.csv, task: U, output: same.parquet}\n",
            r"steps 'a' and 'b' both write same.parquet",
        ),
        (TRAIN + "- {name: first, kind: soup, models: [x, y]}\n", r"two steps are named 'first'"),
        ("- {name: a, kind: mine, model: x, data: y, top_k: 3}\n", r"unknown key steps\.a\.top_k"),
        ("- {name: a, kind: mine, model: x}\n", r"steps\.a: needs data \(files or @steps\) or sources"),
        (
            '- {name: a, kind: filter, model: "builtin:tiny-qwen2", sources: [{path: nowhere/kalm, tasks: subfolders}]}\n',
            r"step 'a': input 'nowhere/kalm' does not exist",
        ),
    ],
    ids=[
        "unknown-kind",
        "unknown-input",
        "cycle",
        "missing-source",
        "same-output",
        "same-name",
        "unknown-key",
        "no-data",
        "missing-source-folder",
    ],
)
def test_bad_recipes_fail_the_dry_run_with_one_named_error(steps, message, tmp_path, in_repo) -> None:
    path = _recipe(steps, tmp_path)
    with pytest.raises(RecipeError) as caught:
        check_recipe(load_recipe(path))
    assert len(caught.value.problems) == 1, caught.value.problems
    assert str(path) in caught.value.problems[0]
    import re

    assert re.search(message, caught.value.problems[0]), caught.value.problems[0]


def test_dry_run_reports_every_problem_at_once(tmp_path, in_repo, capsys) -> None:
    path = _recipe(
        "- {name: a, kind: distil}\n- {name: b, kind: soup, models: x}\n- {name: c, kind: eval, model: m, tasks: T, nope: 1}\n",
        tmp_path,
    )
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "unknown step kind 'distil'" in err and "unknown key steps.c.nope" in err


def test_set_and_selection_errors_name_the_step(tmp_path, in_repo) -> None:
    path = _recipe(TRAIN, tmp_path)
    with pytest.raises(ValueError, match=r"no step named 'second'"):
        load_recipe(path, ["second.set.seed=1"])
    with pytest.raises(ValueError, match=r"--only 'nope': no such step \(steps: first\)"):
        run_recipe(load_recipe(path), only="nope")
    recipe = recipe_from_dict(
        {"output_dir": "x", "steps": [{"name": "a", "kind": "soup", "models": ["p", "q"]}]}, path
    )
    assert recipe.steps[0].settings.models == ("p", "q")


def test_under_a_launcher_only_rank_0_runs_a_curation_step(tmp_path: Path) -> None:
    """torchrun starts the recipe on every rank: a non-train step runs on rank 0, the others wait for its manifest."""
    recipe = tmp_path / "label.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        output_dir: {tmp_path / "run"}
        steps:
          - {{name: label, kind: label, data: data/tiny/tiny_banking77.csv, task: Banking77Classification,
             num_negatives: 3}}
        """)
    )
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "kalm_st.cli", "run", str(recipe)]
    rank1 = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(8)  # long enough to have run the step, had it not waited
        assert rank1.poll() is None, rank1.stdout.read().decode()[-3000:]
        assert not (tmp_path / "run" / "label").exists()  # rank 1 wrote nothing, not even the running marker
        report = run_recipe(load_recipe(recipe))  # rank 0 (no RANK in this process)
        assert report.status == {"label": "ran"}
        output = rank1.communicate(timeout=60)[0].decode()
    finally:
        rank1.kill()
    assert rank1.returncode == 0, output[-3000:]
    assert "runs on rank 0; rank 1 waits" in output


def test_mining_and_filtering_keep_classification_tasks_as_they_are(tmp_path: Path, in_repo: Path) -> None:
    """Negatives of a classification task are other classes (labelling), never retrieval neighbours."""
    import pyarrow.parquet as pq

    recipe = tmp_path / "curate.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        output_dir: {tmp_path / "run"}
        steps:
          - {{name: label, kind: label, data: data/tiny/tiny_banking77.csv, task: Banking77Classification,
             num_negatives: 3}}
          - {{name: filter, kind: filter, model: "builtin:tiny-qwen2", data: "@label", top_k: 1,
             task_types: {{Banking77Classification: Classification}}}}
          - {{name: mine, kind: mine, model: "builtin:tiny-qwen2", data: "@filter", range_min: 0, range_max: 4,
             num_negatives: 1}}   # no type given: MTEB's name says Classification
        """)
    )
    run_recipe(load_recipe(recipe))
    labelled = pq.read_table(tmp_path / "run" / "label" / "data.parquet").to_pydict()
    mined = pq.read_table(tmp_path / "run" / "mine" / "data.parquet").to_pydict()
    assert mined == labelled  # top_k 1 would drop rows and mining would replace the 3 negatives by 1


def test_label_reads_every_shard_of_a_folder_as_one_table(tmp_path: Path, in_repo: Path) -> None:
    import pandas as pd
    import pyarrow.parquet as pq
    from datasets import Dataset

    from kalm_st.data import label_examples

    table = pd.read_csv(in_repo / "data" / "tiny" / "tiny_banking77.csv")
    shards = tmp_path / "banking77"
    shards.mkdir()
    table.iloc[::2].to_csv(shards / "part-0.csv", index=False)
    table.iloc[1::2].to_csv(shards / "part-1.csv", index=False)
    recipe = tmp_path / "label.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        f"steps:\n  - {{name: label, kind: label, data: {shards}, task: Banking77Classification, num_negatives: 3}}\n"
    )
    run_recipe(load_recipe(recipe))
    got = pq.read_table(tmp_path / "run" / "label" / "data.parquet").to_pandas()
    both = pd.concat([table.iloc[::2], table.iloc[1::2]], ignore_index=True)  # the shards in file order
    expected = label_examples(Dataset.from_pandas(both), num_negatives=3).to_pandas()
    assert got.drop(columns="task").to_dict("records") == expected.to_dict("records")


def test_teacher_scores_as_flag_embedding_jsonl_read_back_as_a_source(tmp_path: Path, in_repo: Path) -> None:
    """``flag_embedding: true`` writes FlagEmbedding jsonl whose pos_scores / neg_scores are the label's scores, and
    kalm-st's FlagEmbedding reader (a stage source) turns it back into the same rows and label."""
    import pyarrow.parquet as pq

    from kalm_st.recipe.build import load_sources, resolve_tasks
    from kalm_st.recipe.config import DataConfig, SourceConfig, StageConfig

    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        output_dir: {tmp_path / "run"}
        steps:
          - {{name: label, kind: label, data: data/tiny/tiny_banking77.csv, task: Banking77Classification,
             num_negatives: 3}}
          - {{name: teacher, kind: teacher-score, teacher: "builtin:all-MiniLM-L6-v2", data: "@label",
             instructions: false, flag_embedding: true}}
        """)
    )
    run_recipe(load_recipe(recipe))
    scored = pq.read_table(tmp_path / "run" / "teacher" / "data.parquet").to_pydict()
    lines = (tmp_path / "run" / "teacher" / "flag_embedding" / "Banking77Classification.jsonl").read_text()
    rows = [json.loads(line) for line in lines.splitlines()]
    assert len(rows) == len(scored["anchor"])
    for i, row in enumerate(rows):
        assert row["query"] == scored["anchor"][i] and row["pos"] == [scored["positive"][i]]
        assert row["neg"] == [scored[f"negative_{k}"][i] for k in (1, 2, 3)]
        # jsonl keeps 15 significant digits (pandas' most)
        assert [*row["pos_scores"], *row["neg_scores"]] == pytest.approx(scored["label"][i], rel=1e-13, abs=1e-15)
    config = StageConfig(
        stage="pretrain",
        output_dir=str(tmp_path / "x"),
        data=DataConfig(sources=(SourceConfig(path=str(tmp_path / "run" / "teacher" / "flag_embedding")),)),
        args={"per_device_train_batch_size": 1},
    )
    data, _ = load_sources(config, resolve_tasks(config, {}))
    (back,) = data.values()
    assert back["positive"] == scored["positive"] and back["negative_3"] == scored["negative_3"]
    for got, expected in zip(back["label"], scored["label"], strict=True):
        assert got == pytest.approx(expected, rel=1e-13, abs=1e-15)


# ----------------------------------------------------------------------------------------------------------------------
# keep_intermediate_models: false (the quickstart's setting): stage models removed once read, rebuilt when needed.

_PRUNE_RECIPE = """
output_dir: {out}
keep_intermediate_models: false
steps:
  - name: first
    kind: train
    config: training/configs/tiny_smoke.yaml
    set:
      model: {{max_seq_length: 32}}
      args: {{max_steps: 1, per_device_train_batch_size: 4}}
  - name: second
    kind: train
    config: training/configs/tiny_smoke.yaml
    set:
      model: {{init_from: "@first", max_seq_length: 32}}
      args: {{max_steps: 1, per_device_train_batch_size: 4}}
  - name: soup
    kind: soup
    models: ["@first", "@second"]
    output: {soup}
"""


def test_intermediate_models_are_removed_once_read_and_rebuilt_when_a_reader_must_run(
    tmp_path: Path, in_repo: Path
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(_PRUNE_RECIPE.format(out=tmp_path / "out", soup=tmp_path / "soup"))
    out = tmp_path / "out"
    assert run_recipe(load_recipe(path)).status == dict.fromkeys(["first", "second", "soup"], "ran")
    # Only the deliverable keeps weights: the stage models and the converted built-in backbone are gone ...
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    assert not (out / "first" / "final").exists() and not (out / "second" / "final").exists()
    assert not (out / "builtin" / "tiny-qwen2").exists()
    # ... their manifests stay (marked), so the steps still count as done, and a re-run skips everything, like make.
    for name in ("first", "second"):
        assert json.loads((out / name / MANIFEST).read_text())["pruned"] is True
    assert run_recipe(load_recipe(path)).status == dict.fromkeys(["first", "second", "soup"], "skipped")

    # A changed soup needs both stage models: they are rebuilt first (second needs first), then removed again.
    changed = run_recipe(load_recipe(path, ["soup.weights=[0.25, 0.75]"]))
    assert changed.status == dict.fromkeys(["first", "second", "soup"], "ran")
    assert not (out / "first" / "final").exists() and not (out / "second" / "final").exists()
    # --only cannot rebuild what it needs: one line naming the step and the setting.
    with pytest.raises(ConfigError, match=r"needs the model of step 'first'.*keep_intermediate_models"):
        run_recipe(load_recipe(path, ["soup.weights=[0.5, 0.5]"]), only="soup")


def test_intermediate_models_are_kept_by_default(tmp_path: Path, in_repo: Path) -> None:
    path = tmp_path / "recipe.yaml"
    text = _PRUNE_RECIPE.format(out=tmp_path / "out", soup=tmp_path / "soup")
    path.write_text(text.replace("keep_intermediate_models: false\n", ""))
    run_recipe(load_recipe(path))
    assert (tmp_path / "out" / "first" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "second" / "final" / "model.safetensors").is_file()
