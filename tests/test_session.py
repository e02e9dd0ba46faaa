"""The ONNX Runtime model: loading, batched runs, providers, and the export check against torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_service.errors import DeviceError, ModelError
from stream_service.model.session import InspectionModel, choose_providers
from stream_service.vision.tokens import N_CHANNELS

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def loaded(tiny_model: Any) -> InspectionModel:
    return InspectionModel.load(tiny_model.directory, device="cpu", threads=1)


def windows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 16, 16, N_CHANNELS), dtype=np.float32)


@pytest.mark.parametrize("n", [1, 3, 9])
def test_a_batch_gives_probabilities_and_attention_maps(loaded: InspectionModel, n: int) -> None:
    probs, attention = loaded.run(windows(n))
    assert probs.shape == (n,) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    assert attention.shape == (n, 16, 16) and attention.dtype == np.float32
    assert (attention >= 0).all()
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_runs_agree_with_the_torch_model(loaded: InspectionModel, tiny_model: Any) -> None:
    torch = pytest.importorskip("torch")
    batch = windows(4, seed=1)
    probs, attention = loaded.run(batch)
    tiny_model.torch_model.eval()
    with torch.no_grad():
        logits, t_attention = tiny_model.torch_model(torch.from_numpy(batch))
    np.testing.assert_allclose(probs, torch.softmax(logits, 1)[:, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(attention, t_attention.numpy(), atol=1e-5)


def test_batches_are_independent(loaded: InspectionModel) -> None:
    batch = windows(5, seed=2)
    together, _ = loaded.run(batch)
    alone = np.concatenate([loaded.run(batch[i : i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_load_on_cpu(loaded: InspectionModel, tiny_model: Any) -> None:
    assert loaded.providers == [CPU] and not loaded.on_cuda
    assert loaded.card == tiny_model.card


@pytest.mark.parametrize(
    "shape",
    [(2, 16, 16, N_CHANNELS - 1), (2, 15, 16, N_CHANNELS), (16, 16, N_CHANNELS), (2, 16, 16, N_CHANNELS, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_run_rejects_wrong_window_shapes(loaded: InspectionModel, shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError, match=rf"expected \(N, 16, 16, {N_CHANNELS}\) float32, found {re_shape(shape)}"):
        loaded.run(np.zeros(shape, np.float32))


def re_shape(shape: tuple[int, ...]) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


def test_cuda_without_the_cuda_provider_raises_device_error(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(DeviceError, match=r"'cuda' needs ONNX Runtime's CUDAExecutionProvider.*set device: cpu"):
        InspectionModel.load(tiny_model.directory, device="cuda")


def test_auto_without_cuda_runs_on_the_cpu(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    assert InspectionModel.load(tiny_model.directory, device="auto", threads=1).providers == [CPU]


@pytest.mark.parametrize("spin", [False, True])
def test_idle_threads_busy_wait_only_when_asked(tiny_model: Any, spin: bool) -> None:
    model = InspectionModel.load(tiny_model.directory, device="cpu", threads=2, spin=spin)
    options = model._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("cpu", [CUDA, CPU], [CPU]),
        ("cpu", [CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", ["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),
        ("auto", [CPU], [CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
    ],
)
def test_choose_providers(device: str, available: list[str], expected: list[str]) -> None:
    assert choose_providers(device, available) == expected


@pytest.mark.parametrize(
    ("device", "available", "words"),
    [
        ("cuda", [CPU], ("'cuda'", "CUDAExecutionProvider", f"found only {[CPU]}", "stream-service[gpu]")),
        ("gpu", [CUDA, CPU], ("expected 'auto', 'cpu' or 'cuda'", "found 'gpu'")),
        ("", [CPU], ("found ''",)),
    ],
)
def test_choose_providers_errors(device: str, available: list[str], words: tuple[str, ...]) -> None:
    with pytest.raises(DeviceError) as info:
        choose_providers(device, available)
    for word in words:
        assert word in str(info.value)


def test_an_unloadable_onnx_file_raises_model_error(tiny_model: Any, tmp_path: Path) -> None:
    import json
    import shutil

    from stream_service.model.card import CARD_NAME, ONNX_NAME, file_sha256

    directory = tmp_path / "model"
    shutil.copytree(tiny_model.directory, directory)
    (directory / ONNX_NAME).write_bytes(b"not an onnx graph")
    card = json.loads((directory / CARD_NAME).read_text())
    card["sha256"] = file_sha256(directory / ONNX_NAME)
    (directory / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="expected a loadable ONNX graph"):
        InspectionModel.load(directory, device="cpu")


def test_a_card_with_another_grid_than_the_graph_raises(tiny_model: Any, tmp_path: Path) -> None:
    import json
    import shutil

    from stream_service.model.card import CARD_NAME

    directory = tmp_path / "model"
    shutil.copytree(tiny_model.directory, directory)
    card = json.loads((directory / CARD_NAME).read_text())
    card["window"].update(grid=8, pixels=128)
    (directory / CARD_NAME).write_text(json.dumps(card))
    expected = rf"model input shape: expected \(N, 8, 8, {N_CHANNELS}\), found \['n', 16, 16, {N_CHANNELS}\]"
    with pytest.raises(ModelError, match=expected):
        InspectionModel.load(directory, device="cpu")


def test_check_export_passes_for_the_exported_model(tiny_model: Any) -> None:
    from stream_service.model.card import ONNX_NAME
    from stream_service.training.export import TOLERANCE, check_export

    diffs = check_export(tiny_model.torch_model, tiny_model.directory / ONNX_NAME, windows(4, seed=3))
    assert set(diffs) == {"logits_max_abs_diff", "attention_max_abs_diff"}
    assert max(diffs.values()) <= TOLERANCE


def test_check_export_raises_for_another_models_file(tiny_model: Any) -> None:
    torch = pytest.importorskip("torch")
    from stream_service.model.card import ONNX_NAME
    from stream_service.training.export import check_export
    from stream_service.training.vit import SoartcViT

    torch.manual_seed(99)
    other = SoartcViT(tiny_model.torch_model.cfg)
    with pytest.raises(
        ModelError, match=r"expected torch and ONNX Runtime within 0.0001, found \{'logits_max_abs_diff"
    ):
        check_export(other, tiny_model.directory / ONNX_NAME, windows(4, seed=4))
