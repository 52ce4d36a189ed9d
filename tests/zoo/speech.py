"""A speech classifier on raw audio: transformers' Wav2Vec2ForSequenceClassification from a
small config (a five-layer convolutional feature encoder with group norm, then a
transformer), trained for a few seconds to tell four two-tone "words" apart in noise at
speaking levels, and exported with the legacy exporter as its users do.

Raw waveforms are where static INT8 hurts: the first convolution reads the samples
themselves, quiet audio uses a sliver of the int8 range, and the group norm behind it
scales the error back up.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from tests.zoo.training import one_thread

RATE = 16000
SAMPLES = 4000  # a quarter second
WORDS = ((300.0, 900.0), (500.0, 1500.0), (700.0, 2100.0), (1100.0, 3300.0))
"""Each word: a tone in its first half, another in its second."""


def utterances(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Waveforms [count, SAMPLES] in [-1, 1] and their word labels."""
    labels = rng.integers(0, len(WORDS), count)
    t = np.arange(SAMPLES) / RATE
    half = SAMPLES // 2
    waves = np.empty((count, SAMPLES), np.float32)
    for i, label in enumerate(labels):
        first, second = WORDS[label]
        shift = rng.uniform(0.9, 1.1)
        tone = np.where(np.arange(SAMPLES) < half, np.sin(2 * np.pi * first * shift * t), 0.0)
        tone += np.where(np.arange(SAMPLES) >= half, np.sin(2 * np.pi * second * shift * t), 0.0)
        # Speaking levels span 50 dB (a whisper far away to a shout nearby), noise 30 dB down.
        level = 10 ** rng.uniform(-2.7, -0.3)
        waves[i] = level * (tone + rng.normal(0.0, 0.03, SAMPLES))
    return np.clip(waves, -1.0, 1.0), labels


def samples(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {"input_values": utterances(rng, count)[0]}


def make(directory: Path) -> Path:
    path = directory / "wav2vec2_words.onnx"
    if path.exists():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32, 32, 32),
        conv_stride=(5, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 2),
        feat_extract_norm="group",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_labels=len(WORDS),
        classifier_proj_size=32,
        mask_time_prob=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
    )
    model = transformers.Wav2Vec2ForSequenceClassification(config)
    with one_thread():
        _train(model, np.random.default_rng(0))
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_values: torch.Tensor) -> torch.Tensor:
            return self.inner(input_values, return_dict=False)[0]

    with one_thread(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(),
            (torch.zeros(1, SAMPLES),),
            str(path),
            dynamo=False,
            input_names=["input_values"],
            output_names=["logits"],
            dynamic_axes={"input_values": {0: "batch", 1: "samples"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    return path


def _train(model, rng: np.random.Generator, steps: int = 80, batch: int = 16) -> None:  # type: ignore[no-untyped-def]
    import torch

    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        waves, labels = utterances(rng, batch)
        loss = model(torch.from_numpy(waves), labels=torch.from_numpy(labels)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
