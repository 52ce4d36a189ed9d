"""A small object detector exported with its post-processing, NonMaxSuppression inside an If.

The head predicts, per cell of a stride-8 grid, an objectness, two class scores and a
box; post-processing keeps confident cells and runs class-aware NMS the way
torchvision's ``batched_nms`` does under export: a scripted function
(``torch.jit._script_if_tracing``) that returns nothing for no boxes and otherwise
offsets each class's boxes and calls NMS, so the legacy exporter writes an ``If`` whose
else branch holds the NonMaxSuppression. torchvision itself is not used (its PyPI
wheel does not load beside the CPU build of torch): its NMS is registered the same way,
a custom op with an ONNX symbolic. Trained for a few seconds on synthetic scenes (bright
squares, the class by colour) so that its scores are decided, not random.
"""

# No ``from __future__ import annotations``: torch.library and TorchScript read the
# annotations of the functions below at definition time.
import warnings
from pathlib import Path

import numpy as np
import onnx

from tests.zoo.training import one_thread

SIZE = 64
STRIDE = 8
CLASSES = 2
SCORE_THRESHOLD = 0.3
IOU_THRESHOLD = 0.5


def scenes(rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[list[tuple]]]:
    """Images [count, 3, 64, 64] in [0, 1] with 1-3 squares each, and their objects
    (class, x0, y0, x1, y1)."""
    images = (rng.random((count, 3, SIZE, SIZE)) * 0.25).astype(np.float32)
    objects: list[list[tuple]] = []
    for image in images:
        placed: list[tuple] = []
        for _ in range(rng.integers(1, 4)):
            side = int(rng.integers(10, 22))
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - side, 2))
            if any(not (x0 + side < a or b < x0 or y0 + side < c or d < y0) for _, a, c, b, d in placed):
                continue  # keep objects apart
            label = int(rng.integers(0, CLASSES))
            colour = np.array([0.9, 0.2, 0.2] if label == 0 else [0.2, 0.3, 0.9], np.float32)
            image[:, y0 : y0 + side, x0 : x0 + side] = colour[:, None, None]
            placed.append((label, x0, y0, x0 + side, y0 + side))
        objects.append(placed)
    return images, objects


def samples(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    images, _ = scenes(rng, count)
    return {"images": images}


def make(directory: Path) -> Path:
    path = directory / "detector_nms_in_if.onnx"
    if path.exists():
        return path
    import torch

    _register_nms()
    torch.manual_seed(0)
    with one_thread():
        net = _train(_Detector(), np.random.default_rng(0))
    net.eval()
    with one_thread(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.rand(1, 3, SIZE, SIZE),),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["boxes", "scores", "labels"],
            dynamic_axes={
                "images": {2: "height", 3: "width"},
                "boxes": {0: "detections"},
                "scores": {0: "detections"},
                "labels": {0: "detections"},
            },
            opset_version=17,
        )
    model = onnx.load(path)
    if not any(node.op_type == "If" for node in model.graph.node):
        raise AssertionError("the export has no If: the zoo detector no longer tests control flow")
    return path


_REGISTERED = False


def _register_nms() -> None:
    """NMS as a custom op with an ONNX symbolic, as torchvision registers ``torchvision::nms``."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    from torch.onnx import symbolic_helper

    @torch.library.custom_op("kiln_zoo::nms", mutates_args=())
    def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        order = torch.argsort(scores, descending=True)
        keep: list[int] = []
        for index in order.tolist():
            if all(_iou(boxes[index], boxes[k]) <= iou_threshold for k in keep):
                keep.append(index)
        return torch.tensor(keep, dtype=torch.int64)

    @nms.register_fake
    def _(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)

    @symbolic_helper.parse_args("v", "v", "f")
    def symbolic(g, boxes, scores, iou_threshold):  # type: ignore[no-untyped-def]
        zero = g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64))
        boxes = g.op("Unsqueeze", boxes, zero)
        scores = g.op("Unsqueeze", g.op("Unsqueeze", scores, zero), zero)
        most = g.op("Constant", value_t=torch.tensor([1 << 30], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float))
        selected = g.op("NonMaxSuppression", boxes, scores, most, iou)
        column = g.op("Constant", value_t=torch.tensor(2, dtype=torch.int64))
        return g.op("Gather", selected, column, axis_i=1)

    torch.onnx.register_custom_op_symbolic("kiln_zoo::nms", symbolic, 11)
    _REGISTERED = True


def _iou(a, b) -> float:  # type: ignore[no-untyped-def]
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(float(x1 - x0), 0.0) * max(float(y1 - y0), 0.0)
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def _batched_nms():  # type: ignore[no-untyped-def]
    import torch

    @torch.jit._script_if_tracing
    def batched_nms(
        boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
    ) -> torch.Tensor:
        # torchvision's coordinate trick: boxes of different classes never overlap.
        if boxes.numel() == 0:
            return torch.empty((0,), dtype=torch.int64, device=boxes.device)
        offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return torch.ops.kiln_zoo.nms(boxes + offsets[:, None], scores, iou_threshold)

    return batched_nms


def _Detector():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    batched_nms = _batched_nms()

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1),
                nn.ReLU(),
            )
            self.head = nn.Conv2d(16, 1 + CLASSES + 4, 1)

        def raw(self, images: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(images))

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.raw(images)[0]  # [5 + C... , h, w] for the one image
            h, w = out.shape[1], out.shape[2]
            flat = out.reshape(out.shape[0], -1).t()  # [cells, 1 + C + 4]
            ys = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
            xs = torch.arange(w, dtype=torch.float32).repeat(h)
            cx = (xs + torch.sigmoid(flat[:, 3])) * STRIDE
            cy = (ys + torch.sigmoid(flat[:, 4])) * STRIDE
            bw, bh = torch.exp(flat[:, 5]) * STRIDE, torch.exp(flat[:, 6]) * STRIDE
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
            class_probs = torch.softmax(flat[:, 1 : 1 + CLASSES], dim=1)
            best, labels = class_probs.max(dim=1)
            scores = torch.sigmoid(flat[:, 0]) * best
            confident = torch.nonzero(scores > SCORE_THRESHOLD).squeeze(1)
            boxes, scores, labels = boxes[confident], scores[confident], labels[confident]
            keep = batched_nms(boxes, scores, labels, IOU_THRESHOLD)
            return boxes[keep], scores[keep], labels[keep]

    return Detector()


def _train(net, rng: np.random.Generator, steps: int = 200, batch: int = 16):  # type: ignore[no-untyped-def]
    import torch

    cells = SIZE // STRIDE
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        images, objects = scenes(rng, batch)
        objectness = np.zeros((batch, cells, cells), np.float32)
        label = np.zeros((batch, cells, cells), np.int64)
        box = np.zeros((batch, 4, cells, cells), np.float32)
        for i, placed in enumerate(objects):
            for cls, x0, y0, x1, y1 in placed:
                cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
                gx, gy = int(cx), int(cy)
                objectness[i, gy, gx], label[i, gy, gx] = 1.0, cls
                box[i, :, gy, gx] = [cx - gx, cy - gy, np.log((x1 - x0) / STRIDE), np.log((y1 - y0) / STRIDE)]
        out = net.raw(torch.from_numpy(images))
        target_obj, target_box = torch.from_numpy(objectness), torch.from_numpy(box)
        where = target_obj > 0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], target_obj)
        logits = out[:, 1 : 1 + CLASSES].permute(0, 2, 3, 1)[where]
        loss = loss + torch.nn.functional.cross_entropy(logits, torch.from_numpy(label)[where])
        offsets = torch.sigmoid(out[:, 3:5]).permute(0, 2, 3, 1)[where]
        sizes = out[:, 5:7].permute(0, 2, 3, 1)[where]
        wanted = target_box.permute(0, 2, 3, 1)[where]
        loss = loss + torch.nn.functional.l1_loss(offsets, wanted[:, :2])
        loss = loss + torch.nn.functional.l1_loss(sizes, wanted[:, 2:])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net
