"""Training tests run many tiny torch ops: one intra-op thread is both faster and steadier.

With two threads on a two-core machine that is also running other work, each tiny convolution
pays thread hand-offs (measured: ~15 ms against ~0.15 ms). Subprocesses started by tests keep
torch's default, so what they measure or compare is unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
