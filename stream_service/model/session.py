"""The ONNX Runtime session of the SOARTC ViT: the one module that imports onnxruntime.

``InspectionModel.load(model_dir, device)`` validates the card and the file's sha256, then opens a
session with the CUDA execution provider when the device allows it (IOBinding: inputs bound where
they already are, outputs allocated on the GPU and copied back once) and the CPU provider otherwise.
All windows of a frame go through one batched ``run``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from stream_service.errors import DeviceError, ModelError
from stream_service.model.card import ModelCard, load_card
from stream_service.vision.arrays import F32

log = logging.getLogger(__name__)

INSTALL_CPU = "pip install 'stream-service[cpu]'"
INSTALL_GPU = "pip install 'stream-service[gpu]'"


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            f"ONNX Runtime: expected the onnxruntime module, found none (install it with: {INSTALL_CPU} "
            f"or, on a CUDA machine, {INSTALL_GPU})"
        ) from exc
    return onnxruntime


def choose_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers for the ``device`` setting (auto|cpu|cuda) given what ONNX Runtime offers."""
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if not has_cuda:
            raise DeviceError(
                f"inference device: 'cuda' needs ONNX Runtime's CUDAExecutionProvider, found only {available} "
                f"(install it with: {INSTALL_GPU}, or set device: cpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    raise DeviceError(f"inference device: expected 'auto', 'cpu' or 'cuda', found {device!r}")


class InspectionModel:
    """The ViT behind its card: ``run(windows (N, g, g, C) float32) -> (fail prob (N,), attention (N, g, g))``."""

    def __init__(self, card: ModelCard, session: Any, providers: list[str]) -> None:
        self.card = card
        self._session = session
        self.providers = providers
        self.on_cuda = providers[0] == "CUDAExecutionProvider"
        self._input = session.get_inputs()[0].name
        self._outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: Literal["auto", "cpu", "cuda"] | str = "auto",
        threads: int = 0,
        spin: bool = False,
    ) -> InspectionModel:
        """Open ``model_dir`` (card.json + model.onnx); threads = 0 lets ONNX Runtime choose.

        ``spin``: let ONNX Runtime's idle threads busy-wait for the next run. Off by default: on a host
        shared with the other stages, spinning threads (one per core by default) took the cores the soartc
        stage needed (its latency went from 52 to 170 ms on a 16-core machine), and on 2 cores a run
        was no slower without it.
        """
        card = load_card(model_dir)
        ort = _import_ort()
        providers = choose_providers(device, list(ort.get_available_providers()))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(model_dir / card.onnx), sess_options=options, providers=providers)
        except Exception as exc:
            raise ModelError(
                f"model file {model_dir / card.onnx}: expected a loadable ONNX graph, found: {exc}"
            ) from exc
        shape = session.get_inputs()[0].shape
        expected = [card.window.grid, card.window.grid, len(card.features.channels)]
        if list(shape[1:]) != expected:
            raise ModelError(f"model input shape: expected (N, {', '.join(map(str, expected))}), found {shape}")
        log.info("model %s %s on %s", card.name, card.version, providers[0])
        return cls(card, session, providers)

    def run(self, windows_nggc: F32) -> tuple[F32, F32]:
        """Fail probabilities (N,) and class-token attention (N, g, g) of a batch of windows."""
        # ONNX Runtime reports the input shape as a list: compare as tuples (a tuple never equals a list).
        if windows_nggc.ndim != 4 or windows_nggc.shape[1:] != tuple(self._session.get_inputs()[0].shape[1:]):
            raise ModelError(
                f"model input: expected (N, {self.card.window.grid}, {self.card.window.grid}, "
                f"{len(self.card.features.channels)}) float32, found {windows_nggc.shape}"
            )
        batch = np.ascontiguousarray(windows_nggc, dtype=np.float32)
        try:
            if self.on_cuda:
                logits, attention = self._run_bound(batch)
            else:
                logits, attention = self._session.run(self._outputs, {self._input: batch})
        except Exception as exc:  # ONNX Runtime's own exception types derive from Exception only
            raise ModelError(
                f"model run: expected outputs for {len(batch)} windows, found {type(exc).__name__}: {exc}"
            ) from exc
        return _fail_probability(logits), np.asarray(attention, np.float32)

    def _run_bound(self, batch: F32) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """CUDA provider with IOBinding: one upload of the batch, outputs kept on the GPU until copied back."""
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._input, batch)
        for name in self._outputs:
            binding.bind_output(name, "cuda")
        self._session.run_with_iobinding(binding)
        logits, attention = binding.copy_outputs_to_cpu()
        return logits, attention


def _fail_probability(logits: npt.NDArray[np.float32]) -> F32:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e[:, 1] / e.sum(axis=1), np.float32)
