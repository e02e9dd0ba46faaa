"""Model cards: a valid card loads; every broken card or model file raises ModelError naming what is wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stream_service.errors import ModelError
from stream_service.model.card import (
    CARD_NAME,
    ONNX_NAME,
    ModelCard,
    file_sha256,
    load_card,
    resolve_model_dir,
)
from stream_service.vision.tokens import CHANNEL_NAMES


def test_a_valid_card_loads(tiny_model: Any) -> None:
    card = load_card(tiny_model.directory)
    assert isinstance(card, ModelCard)
    assert card == tiny_model.card
    assert card.sha256 == file_sha256(tiny_model.directory / ONNX_NAME)
    assert tuple(card.features.channels) == CHANNEL_NAMES
    assert card.window.pixels == card.window.grid * card.features.block == 256
    spec = card.features.to_spec()
    assert spec.block == 16 and spec.calibration.constants == (0.2, 0.5, 0.1)
    assert card.training["baseline"] == {"threshold": 0.3, "open_px": 3, "min_area": 20}
    assert spec.tolerance_px == 0, "a card without a tolerance compares pixel to pixel"


def test_the_cards_jitter_tolerance_reaches_the_features(tiny_model: Any, tmp_path: Path) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model.directory, directory)
    edit_card(set_path("features.tolerance_px", 1))(directory)
    assert load_card(directory).features.to_spec().tolerance_px == 1


def edit_card(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        card = json.loads((directory / CARD_NAME).read_text())
        change(card)
        (directory / CARD_NAME).write_text(json.dumps(card))

    return apply


def set_path(keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(card: dict[str, Any]) -> None:
        *parents, last = keys.split(".")
        for key in parents:
            card = card[key]
        card[last] = value

    return change


def tamper(directory: Path) -> None:
    with (directory / ONNX_NAME).open("ab") as fh:
        fh.write(b"\0")


def swap_sha(directory: Path) -> None:
    edit_card(set_path("sha256", "0" * 64))(directory)


REVERSED = list(reversed(CHANNEL_NAMES))

# (id, how to break a copy of the model folder, words the message must hold: the field or file, the
# expected value, the found value)
BROKEN: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("missing card", lambda d: (d / CARD_NAME).unlink(), (CARD_NAME, "expected", "found no such file")),
    ("bad json", lambda d: (d / CARD_NAME).write_text("{not json"), (CARD_NAME, "expected JSON", "found", "line 1")),
    (
        "missing field",
        edit_card(lambda c: c.pop("threshold")),
        (CARD_NAME, "threshold", "Field required", "found {"),
    ),
    (
        "missing nested field",
        edit_card(lambda c: c["window"].pop("stride")),
        ("window.stride", "Field required"),
    ),
    (
        "threshold out of range",
        edit_card(set_path("threshold.value", 1.5)),
        ("threshold.value", "less than or equal to 1", "found 1.5"),
    ),
    ("unknown key", edit_card(set_path("colour", "red")), ("colour", "Extra inputs", "found 'red'")),
    (
        "bad block",
        edit_card(set_path("features.block", 12)),
        ("features.block", "8 or 16", "found 12"),
    ),
    (
        "wrong channel list",
        edit_card(set_path("features.channels", REVERSED)),
        ("features.channels", f"expected {list(CHANNEL_NAMES)}", f"found {REVERSED}"),
    ),
    (
        "missing channel",
        edit_card(set_path("features.channels", list(CHANNEL_NAMES[:-1]))),
        ("features.channels", f"expected {list(CHANNEL_NAMES)}", f"found {list(CHANNEL_NAMES[:-1])}"),
    ),
    (
        "wrong window pixels",
        edit_card(set_path("window.pixels", 255)),
        ("window.pixels", "expected grid * block = 256", "found 255"),
    ),
    (
        "tolerance out of range",
        edit_card(set_path("features.tolerance_px", 3)),
        ("features.tolerance_px", "less than or equal to 2", "found 3"),
    ),
    (
        "malformed sha",
        edit_card(set_path("sha256", "abc")),
        ("sha256", "pattern", "found 'abc'"),
    ),
    (
        "missing onnx file",
        lambda d: (d / ONNX_NAME).unlink(),
        (ONNX_NAME, "expected", "named by", CARD_NAME, "found no such file"),
    ),
    (
        "card names another file",
        edit_card(set_path("onnx", "other.onnx")),
        ("other.onnx", "found no such file"),
    ),
    ("tampered onnx", tamper, (ONNX_NAME, "expected sha256", "(from the card)", "found")),
    ("card sha of another file", swap_sha, (ONNX_NAME, "expected sha256 " + "0" * 64, "found")),
]


@pytest.mark.parametrize(("name", "breaks", "words"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_cards_raise_model_error_naming_the_problem(
    tiny_model: Any, tmp_path: Path, name: str, breaks: Callable[[Path], None], words: tuple[str, ...]
) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model.directory, directory)
    breaks(directory)
    with pytest.raises(ModelError) as info:
        load_card(directory)
    message = str(info.value)
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"


def test_tampered_onnx_message_holds_both_hashes(tiny_model: Any, tmp_path: Path) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model.directory, directory)
    tamper(directory)
    with pytest.raises(ModelError) as info:
        load_card(directory)
    assert tiny_model.card.sha256 in str(info.value)
    assert file_sha256(directory / ONNX_NAME) in str(info.value)


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"is the model path right\?"):
        load_card(tmp_path / "nowhere")


def test_file_sha256_of_a_known_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_resolve_model_dir(tiny_model: Any, tmp_path: Path) -> None:
    assert resolve_model_dir(tiny_model.directory) == tiny_model.directory  # an existing folder, as given
    assert resolve_model_dir(tmp_path / "absent") == tmp_path / "absent"  # absolute: never redirected
    relative = Path("surely-not-a-bundled-model")
    assert resolve_model_dir(relative) == relative
