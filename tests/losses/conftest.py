"""Fixtures of the loss tests."""

from __future__ import annotations

import pytest

from tests.losses._helpers import ANCHORS, NEGATIVES_1, NEGATIVES_2, POSITIVES


@pytest.fixture
def columns() -> list[list[str]]:
    """(anchor, positive, negative_1, negative_2) for 6 rows."""
    return [ANCHORS, POSITIVES, NEGATIVES_1, NEGATIVES_2]
