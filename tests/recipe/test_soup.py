"""The soup of models is the exact weighted mean of their parameters, and saves as a plain ST folder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kalm_st.recipe.soup import soup, soup_state_dicts


def _perturbed(model, seed: int):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return other


def test_soup_of_two_models_is_their_exact_mean(tiny_model, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    a, b = tiny_model, _perturbed(tiny_model, 1)
    a.save(str(tmp_path / "a"))
    b.save(str(tmp_path / "b"))
    out = soup([tmp_path / "a", tmp_path / "b"], tmp_path / "soup")
    souped = SentenceTransformer(str(out), device="cpu")  # plain ST loads it
    sd_a, sd_b, sd_s = a.state_dict(), b.state_dict(), souped.state_dict()
    assert sd_s.keys() == sd_a.keys()
    for name in sd_a:
        expected = ((sd_a[name].double() + sd_b[name].double()) / 2).to(sd_a[name].dtype)
        assert torch.equal(sd_s[name], expected), name
    assert any(not torch.equal(sd_a[n], sd_b[n]) for n in sd_a)


def test_weighted_soup_and_errors() -> None:
    x = {"w": torch.tensor([0.0, 4.0]), "step": torch.tensor([3])}
    y = {"w": torch.tensor([1.0, 0.0]), "step": torch.tensor([3])}
    out = soup_state_dicts([x, y], [3, 1])
    assert torch.equal(out["w"], torch.tensor([0.25, 3.0])) and torch.equal(out["step"], torch.tensor([3]))
    with pytest.raises(ValueError, match="at least 2"):
        soup_state_dicts([x])
    with pytest.raises(ValueError, match="different parameters"):
        soup_state_dicts([x, {"v": torch.zeros(2), "step": torch.tensor([3])}])
    with pytest.raises(ValueError, match=r"model 0 has \(2,\)"):
        soup_state_dicts([x, {"w": torch.zeros(3), "step": torch.tensor([3])}])


def test_soup_matches_sentence_transformers_merge(tiny_model, tmp_path: Path) -> None:
    """Independent reference: ST's linear merge (mergekit, in the test extra)."""
    from sentence_transformers import SentenceTransformer

    a, b = tiny_model, _perturbed(tiny_model, 2)
    a.save(str(tmp_path / "a"))
    b.save(str(tmp_path / "b"))
    ours = SentenceTransformer(str(soup([tmp_path / "a", tmp_path / "b"], tmp_path / "soup")), device="cpu")
    merged = SentenceTransformer.merge([str(tmp_path / "a"), str(tmp_path / "b")], method="linear")
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor)
