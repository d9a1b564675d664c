"""Service test fixtures: model repositories in temporary folders, and live uvicorn servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with every kind of model the end-to-end tests need, good and bad."""
    root = tmp_path_factory.mktemp("repo")
    om.publish(root, "digits", 1, om.DIGITS)
    om.publish(root, "typed", 1, om.typed_model())
    om.publish(root, "affine", 1, om.affine_model())
    om.publish(root, "fixed", 1, om.fixed_batch_model())
    om.publish(root, "bn_eval", 1, om.batchnorm_model(training=False))
    om.publish(root, "bn_train", 1, om.batchnorm_model(training=True))
    om.publish(root, "corrupt", 1, b"this is not an onnx file")
    return root


@pytest.fixture(scope="session")
def server(repo: Path) -> Iterator[LiveServer]:
    """One shared server, no token; it must stay healthy through every test that uses it."""
    with start_server(repo, models="digits,typed,affine,fixed,bn_eval") as live:
        yield live
