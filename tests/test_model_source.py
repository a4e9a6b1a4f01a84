"""``kalm_st.model_source.resolve_model``: every kind of model string, and the one set of errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kalm_st.model_source import resolve_model

from .test_convert import _released_kalm_layout


def _first_token_moves_with_the_last(model) -> bool:
    """Bidirectional attention: the first token's state depends on the last token (causal attention: never)."""
    backbone = model[0].auto_model.eval()
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])
    with torch.no_grad():
        states = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return not torch.allclose(states[0, 0], states[1, 0])


def test_a_decoder_checkpoint_is_made_bidirectional(tiny_qwen_dir: Path) -> None:
    model = resolve_model(tiny_qwen_dir, max_seq_length=64)
    assert [type(m).__name__ for m in model] == ["BidirectionalDecoder", "MeanPooling", "Normalize"]
    assert model.max_seq_length == 64 and _first_token_moves_with_the_last(model)


def test_a_saved_model_loads_as_saved(tiny_model, tmp_path: Path) -> None:
    tiny_model.save(str(tmp_path / "m"))
    model = resolve_model(tmp_path / "m", max_seq_length=16)
    assert model.max_seq_length == 16
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_the_released_kalm_layout_is_rebuilt_bidirectional(tmp_path: Path) -> None:
    folder = _released_kalm_layout(tmp_path / "release")
    model = resolve_model(folder)  # loaded as it is, transformers would run Qwen2 causally (auto_map is ignored)
    assert type(model[0]).__name__ == "BidirectionalDecoder" and model.max_seq_length == 128
    assert _first_token_moves_with_the_last(model)


def test_a_builtin(tmp_path: Path) -> None:
    model = resolve_model("builtin:tiny-qwen2", builtin_dir=tmp_path)
    assert (tmp_path / "tiny-qwen2" / "config.json").is_file()  # written once, reused by later steps
    assert _first_token_moves_with_the_last(model)
    with pytest.raises(ValueError, match=r"^step 'x': model: 'builtin:nope' is not a built-in model \(known: "):
        resolve_model("builtin:nope", what="step 'x': model")


def test_errors_name_where_the_value_came_from(tiny_model, tmp_path: Path) -> None:
    what = "recipe.yaml: step 'eval': model"
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(tmp_path / "gone", what=what)
    assert str(info.value) == f"{what} {str(tmp_path / 'gone')!r} does not exist."
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(tmp_path / "stage1" / "final", what=what)
    assert str(info.value).endswith("does not exist (a previous stage's output: run that stage first).")
    with pytest.raises(FileNotFoundError) as info:
        resolve_model("someone/not-cached-model", what=what)
    assert str(info.value) == (
        f"{what} 'someone/not-cached-model' does not exist (and the Hub is offline: HF_HUB_OFFLINE is set)."
    )
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; give the model's folder"):
        resolve_model(tmp_path / "file.txt", what=what)


def test_a_stage_output_folder_points_to_its_final_model(tiny_model, tmp_path: Path) -> None:
    tiny_model.save(str(tmp_path / "stage2" / "final"))
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(tmp_path / "stage2", what="--model")
    assert str(info.value) == (
        f"--model {str(tmp_path / 'stage2')!r} has neither modules.json nor config.json: not a model folder (it "
        f"holds a model in {str(tmp_path / 'stage2' / 'final')!r}: a stage's output folder; give that)."
    )
