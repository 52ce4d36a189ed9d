"""Regenerate the compatibility table in docs/MODELS.md from the test zoo.

Builds every zoo model (tests/zoo/models.py) at fp32, fp16, int8 and auto exactly as
the zoo tests do (no repair), builds INT8 again with repair where it failed the gate,
and rewrites the table between the markers in docs/MODELS.md.

    PYTHONPATH=. python benchmarks/models_table.py [--models yolov8n,sklearn-mlp] [--out docs/MODELS.md]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

from tests.zoo.harness import Cell, build_cell, passes
from tests.zoo.models import BY_NAME, ZOO

PRECISIONS = ("fp32", "fp16", "int8", "auto")
BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"


def describe(cell: Cell) -> str:
    if cell.state == "refused":
        return "refused: " + cell.message.split(": ", 1)[-1].replace("|", "/")[:160]
    text = "ready" if cell.served == cell.precision else f"ready ({cell.served})"
    if passes(cell):
        text += " (outside agreement: " + "; ".join(passes(cell)) + ")"
    return text


def agreement(cells: list[Cell]) -> str:
    parts = []
    for cell in cells:
        if cell.state != "ready" or cell.precision == "fp32" or cell.served == "fp32":
            continue
        values = []
        for metrics in cell.agreement.values():
            rule = metrics.get("decided_by", "")
            if rule.startswith("top1"):
                axis = metrics.get("rule", "").rpartition("=")[2]
                values.append(f"top-1 (axis {axis}) {metrics['top1_agreement']:.3f}")
            elif rule == "exact_match":
                values.append(f"exact {metrics['exact_match']:.3f}")
            elif rule == "cosine_similarity":
                values.append(f"cos {metrics['cosine_similarity']:.4f}")
        parts.append(f"{cell.precision}: {', '.join(values)}")
    return "; ".join(parts) or "-"


def repaired(cell: Cell | None) -> str:
    """INT8 again with repair, for a model whose INT8 failed the gate."""
    if cell is None:
        return "-"
    if cell.state == "refused":
        reason = cell.report.get("repair", {}).get("stopped") or cell.message
        return "refused: " + reason[:120].replace("|", "/")
    problems = passes(cell)
    outside = f" (outside agreement: {'; '.join(problems)})" if problems else ""
    return f"ready: {cell.report.get('repair', {}).get('chosen', '')}{outside}"


def signature_text(cell: Cell) -> str:
    if cell.signature is None:
        return "-"
    show = lambda spec: f"{spec.name} {spec.dtype}{['?' if d < 0 else d for d in spec.shape]}"  # noqa: E731
    return ", ".join(map(show, cell.signature.inputs)) + " → " + ", ".join(map(show, cell.signature.outputs))


def latency(cells: dict[str, Cell]) -> str:
    fp32, int8 = cells["fp32"].latency_ms, cells["int8"].latency_ms
    if fp32 is None:
        return "not profiled (synthetic inputs rejected)"
    if cells["int8"].state != "ready" or int8 is None:
        return f"{fp32:.3g} ms / -"
    return f"{fp32:.3g} ms / {int8:.3g} ms ({fp32 / int8:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--out", default="docs/MODELS.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    models = [BY_NAME[name] for name in args.models.split(",")] if args.models else list(ZOO)
    rows = [
        "| model | exporter | signature | fp32 | fp16 | int8 | auto | int8 with repair | agreement "
        "| latency fp32 / int8 (batch 1) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        zoo_dir = Path(scratch) / "zoo"
        zoo_dir.mkdir()
        for model in models:
            path = model.make(zoo_dir)
            cells = {p: build_cell(model, path, p, Path(scratch) / f"{model.name}-{p}") for p in PRECISIONS}
            fixed = None
            if "outside tolerance" in cells["int8"].message:
                where = Path(scratch) / f"{model.name}-int8-repair"
                fixed = build_cell(model, path, "int8", where, repair=True)
            print(model.name, {p: c.state for p, c in cells.items()}, fixed and fixed.state, flush=True)
            rows.append(
                f"| {model.name} | {model.exporter} | {signature_text(cells['fp32'])} | "
                + " | ".join(describe(cells[p]) for p in PRECISIONS)
                + f" | {repaired(fixed)} | {agreement([*cells.values(), *([fixed] if fixed else [])])} "
                + f"| {latency(cells)} |"
            )
    page = Path(args.out)
    text = page.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    page.write_text(text[:start] + "\n" + "\n".join(rows) + "\n" + text[end:])


if __name__ == "__main__":
    main()
