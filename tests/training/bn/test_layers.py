"""The eval-mode guard (one for folding, evaluating and exporting) names the classic mistake."""

from __future__ import annotations

import pytest
from torch import nn

from training.bn.layers import require_eval_mode
from training.errors import TrainingModeError


def test_eval_guard_names_the_classic_mistake():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(TrainingModeError, match=r"\b1\b.*batch's own statistics.*model.eval\(\)"):
        require_eval_mode(model, "export")
    require_eval_mode(model.eval(), "export")
