"""Export of the SOARTC ViT to ONNX with two outputs, logits and the class-token attention.

The legacy TorchScript exporter (opset 17) is used: it keeps the written-out attention as plain
MatMul/Softmax nodes that ONNX Runtime fuses well on the CPU. The export is checked against torch on
random and real windows (max absolute difference <= 1e-4 for both outputs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from stream_service.errors import ModelError
from stream_service.training.vit import SoartcViT

OPSET = 17
TOLERANCE = 1e-4


def export_onnx(model: SoartcViT, path: Path) -> None:
    """Write ``model`` to ``path``.

    Input ``windows`` (N, g, g, C) float32; outputs ``logits`` (N, 2) and ``attention`` (N, g, g).
    """
    cfg = model.cfg
    model.eval()
    example = torch.zeros(2, cfg.grid, cfg.grid, cfg.channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["windows"],
            output_names=["logits", "attention"],
            dynamic_axes={"windows": {0: "n"}, "logits": {0: "n"}, "attention": {0: "n"}},
            opset_version=OPSET,
            dynamo=False,
        )


def check_export(model: SoartcViT, path: Path, windows: npt.NDArray[np.float32]) -> dict[str, float]:
    """Max absolute differences between torch and ONNX Runtime on ``windows``; raises beyond TOLERANCE."""
    import onnxruntime as ort

    model.eval()
    with torch.no_grad():
        logits, attention = model(torch.from_numpy(windows))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    o_logits, o_attention = session.run(["logits", "attention"], {"windows": windows})
    diffs = {
        "logits_max_abs_diff": float(np.abs(o_logits - logits.numpy()).max()),
        "attention_max_abs_diff": float(np.abs(o_attention - attention.numpy()).max()),
    }
    if max(diffs.values()) > TOLERANCE:
        raise ModelError(f"ONNX export of {path}: expected torch and ONNX Runtime within {TOLERANCE}, found {diffs}")
    return diffs
