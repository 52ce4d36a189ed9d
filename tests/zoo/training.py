"""What the zoo's briefly trained models share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train and export on one torch thread: small models on a shared 2-core machine run
    many times faster than with two threads fighting the other jobs (0.03 s against
    0.6 s per step of the zoo's GPT-2 under a load of 4)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
