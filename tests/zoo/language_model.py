"""A causal language model: transformers' GPT2LMHeadModel from a small config, trained for
a few seconds on characters of English text and exported with the dynamo exporter.
Its ``logits`` are next-token scores ``[N, T, V]``: the accuracy gate judges them by
strict next-token agreement over the vocabulary axis.

The text is the Python standard library's own documentation (module docstrings), so
it is there offline: training text from some modules, held-out text from others.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx

from tests.zoo.training import one_thread

VOCAB = 128  # ASCII characters
CONTEXT = 32
TRAINING_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "decimal", "email", "fractions",
    "functools", "heapq", "http", "inspect", "json", "logging", "pathlib", "pickle", "queue",
    "random", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "threading",
)  # fmt: skip
HELD_OUT_MODULES = ("textwrap", "typing", "unittest", "uuid", "zipfile", "calendar", "difflib", "gzip")


def text(modules: tuple[str, ...]) -> np.ndarray:
    """The modules' docstrings as ASCII codes."""
    import importlib
    import inspect

    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module, lambda m: inspect.isclass(m) or inspect.isfunction(m)):
            parts.append(inspect.getdoc(member) or "")
    joined = " ".join(" ".join(part.split()) for part in parts if part)
    return np.frombuffer(joined.encode("ascii", "replace"), np.uint8).astype(np.int64) % VOCAB


def windows(codes: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    starts = rng.integers(0, len(codes) - CONTEXT - 1, count)
    return np.stack([codes[s : s + CONTEXT] for s in starts])


def samples(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Windows of held-out text (calibration and validation data a user would send)."""
    return {"input_ids": windows(text(HELD_OUT_MODULES), rng, count)}


def training_samples(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {"input_ids": windows(text(TRAINING_MODULES), rng, count)}


def make(directory: Path) -> Path:
    path = directory / "gpt2_chars.onnx"
    if path.exists():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config)
    with one_thread():
        _train(model, text(TRAINING_MODULES), np.random.default_rng(0))
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids, return_dict=False, use_cache=False)[0]

    with one_thread(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The legacy exporter has no aten::diff, which transformers' causal mask uses.
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=64)
        program = torch.onnx.export(
            Logits(),
            (torch.zeros(2, CONTEXT, dtype=torch.long),),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
            verbose=False,
        )
    assert program is not None
    onnx.save(program.model_proto, path)
    return path


def _train(model, codes: np.ndarray, rng: np.random.Generator, steps: int = 300) -> None:  # type: ignore[no-untyped-def]
    import torch

    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = torch.from_numpy(windows(codes, rng, 32))
        loss = model(batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
