"""A semantic segmentation net: transformers' SegformerForSemanticSegmentation from a small
config, trained for a few seconds to label each pixel of the detector's synthetic scenes
(background, red squares, blue squares), exported with the legacy exporter. Its
``logits`` are ``[N, C, H/4, W/4]``: the gate judges them per pixel over axis 1.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from tests.zoo.detector import SIZE, scenes
from tests.zoo.training import one_thread

CLASSES = 3  # background and the detector's two kinds of square


def labelled(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [count, 3, 64, 64] and label maps [count, 16, 16] at the logits' scale."""
    images, objects = scenes(rng, count)
    labels = np.zeros((count, SIZE, SIZE), np.int64)
    for i, placed in enumerate(objects):
        for cls, x0, y0, x1, y1 in placed:
            labels[i, y0:y1, x0:x1] = cls + 1
    return images, labels[:, 2::4, 2::4]


def samples(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {"pixel_values": labelled(rng, count)[0]}


def make(directory: Path) -> Path:
    path = directory / "segformer_scenes.onnx"
    if path.exists():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        num_channels=3,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    model = transformers.SegformerForSemanticSegmentation(config)
    with one_thread():
        _train(model, np.random.default_rng(0))
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values, return_dict=False)[0]

    with one_thread(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(),
            (torch.rand(2, 3, SIZE, SIZE),),
            str(path),
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    return path


def _train(model, rng: np.random.Generator, steps: int = 150) -> None:  # type: ignore[no-untyped-def]
    import torch

    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        images, labels = labelled(rng, 16)
        logits = model(torch.from_numpy(images), return_dict=False)[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
