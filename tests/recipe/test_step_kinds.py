"""A step kind is declared in one place: a settings dataclass with ``@step_kind`` (its name, runner, input and model
keys, default output). This test declares a new kind here and nowhere else, and the recipe parser, the dry run, the
input checks and fingerprints, ``@step`` resolution and the runner all take it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kalm_st.cli import main
from kalm_st.recipe.config import ConfigError
from kalm_st.recipe.recipe import STEP_KINDS, RecipeError, recipe_from_dict, step_kind
from kalm_st.recipe.runner import MANIFEST, check_recipe, run_recipe


def run_concat(ctx: Any) -> dict[str, Any]:
    """The new kind's runner: its ``data`` files' lines, in order, into its output."""
    lines = [line for path in ctx.settings.data for line in Path(path).read_text(encoding="utf8").splitlines()]
    ctx.output.parent.mkdir(parents=True, exist_ok=True)
    ctx.output.write_text("".join(f"{line}{ctx.settings.suffix}\n" for line in lines), encoding="utf8")
    return {"lines": len(lines)}


@pytest.fixture
def concat_kind() -> Iterator[type]:
    @step_kind("concat", run_concat, inputs=("data",), models=("model",), output="lines.txt")
    @dataclass(frozen=True)
    class ConcatStep:
        data: tuple[str, ...]
        suffix: str = ""
        model: str | None = None  # read by nothing here: declared a model input, so the dry run lists a Hub id

    yield ConcatStep
    del STEP_KINDS["concat"]


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf8")
    return str(path)


def test_a_step_kind_declared_in_one_place_parses_checks_runs_and_resolves_references(
    concat_kind: type, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = write(tmp_path / "a.txt", "x\ny\n"), write(tmp_path / "b.txt", "z\n")
    raw = {
        "output_dir": str(tmp_path / "run"),
        "steps": [
            {"name": "joined", "kind": "concat", "data": [first, second], "model": "some-org/some-model"},
            {"name": "marked", "kind": "concat", "data": ["@joined", second], "suffix": "!"},
        ],
    }
    recipe = recipe_from_dict(raw, tmp_path / "recipe.yaml")
    assert isinstance(recipe.step("joined").settings, concat_kind)
    assert recipe.step("marked").references() == ["joined"]
    # The dry run checks the declared inputs: the model is a Hub id (listed, not checked), the files exist.
    assert check_recipe(recipe) == ["step 'joined': some-org/some-model"]

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw), encoding="utf8")
    assert main(["run", str(tmp_path / "recipe.yaml"), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == ["joined\tchecked", "marked\tchecked"]
    assert not (tmp_path / "run").exists()

    assert run_recipe(recipe).status == {"joined": "ran", "marked": "ran"}
    assert (tmp_path / "run" / "joined" / "lines.txt").read_text() == "x\ny\nz\n"  # the declared default output
    assert (tmp_path / "run" / "marked" / "lines.txt").read_text() == "x!\ny!\nz!\nz!\n"  # @joined read as a file
    manifest = json.loads((tmp_path / "run" / "marked" / MANIFEST).read_text())
    assert manifest["inputs"] == [str(tmp_path / "run" / "joined" / "lines.txt"), second]
    assert manifest["summary"] == {"lines": 4}

    assert run_recipe(recipe).status == {"joined": "skipped", "marked": "skipped"}
    write(tmp_path / "b.txt", "w\n")  # a declared input changed: both steps read it, both run again
    assert run_recipe(recipe).status == {"joined": "ran", "marked": "ran"}
    assert (tmp_path / "run" / "marked" / "lines.txt").read_text() == "x!\ny!\nw!\nw!\n"


def test_a_declared_kind_gets_the_parser_and_dry_run_errors(concat_kind: type, tmp_path: Path) -> None:
    def recipe(**step: Any) -> Any:
        return recipe_from_dict({"output_dir": str(tmp_path), "steps": [step]}, tmp_path / "r.yaml")

    with pytest.raises(ConfigError, match=r"unknown key steps\.c\.colour .*allowed in steps\.c: data, model, suffix"):
        recipe(name="c", kind="concat", data=["x"], colour=1)
    with pytest.raises(ConfigError, match=r"missing required key steps\.c\.data"):
        recipe(name="c", kind="concat")
    with pytest.raises(RecipeError, match=r"step 'c': input '.*missing\.txt' does not exist"):
        check_recipe(recipe(name="c", kind="concat", data=str(tmp_path / "missing.txt")))  # one value, no brackets
    with pytest.raises(ValueError, match="declared twice"):
        step_kind("concat", run_concat)(concat_kind)
