"""The soup recipe (train --folds K --soup-regional-etch-px N): two ingredients from one initialisation, averaged."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from stream_service.errors import InputError  # noqa: E402
from stream_service.training import cv  # noqa: E402
from stream_service.training.synthetic import synthetic_items  # noqa: E402
from stream_service.training.train import TrainConfig, config_dict, soup, train_on  # noqa: E402
from stream_service.training.vit import VitConfig  # noqa: E402
from stream_service.vision.tokens import N_CHANNELS  # noqa: E402


def tiny(**changes: Any) -> TrainConfig:
    cfg = TrainConfig(
        minutes=0.02,
        rounds=1,
        train_windows_per_image=2,
        vit=VitConfig(channels=N_CHANNELS, dim=16, depth=1, heads=2),
        calibration_images=2,
        workers=1,
        val_groups=(),
    )
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return synthetic_items(tmp_path_factory.mktemp("soup-pairs"), boards=1, frames=2)


def _params(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_soup_is_the_midpoint_of_its_ingredients_and_refuses_another_front_end(pairs: list[Any]) -> None:
    a = train_on(pairs, [], tiny())
    b = train_on(pairs, [], tiny(augment=dataclasses.replace(tiny().augment, regional_etch_px=3.0)))
    pa, pb = _params(a.model), _params(b.model)
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)  # the etching changed what was learnt
    made = soup([a, b], tiny(soup_regional_etch_px=3.0))
    for name, value in made.model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, (pa[name] + pb[name]) / 2), name
    assert made.spec == a.spec and made.config.soup_regional_etch_px == 3.0
    assert made.seconds == pytest.approx(a.seconds + b.seconds)
    # The card records each ingredient's steps, not the last one's alone.
    assert cv.steps_of(made.history) == [a.history[-1]["step"], b.history[-1]["step"]]
    assert cv.steps_of(a.history) == a.history[-1]["step"] and cv.steps_of([]) == 0
    other = dataclasses.replace(b, spec=dataclasses.replace(b.spec, tolerance_px=1))
    with pytest.raises(InputError, match="soup ingredients: expected one feature spec"):
        soup([a, other], tiny(soup_regional_etch_px=3.0))


def test_the_soup_recipe_trains_each_ingredient_under_its_own_key_and_resumes(
    pairs: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = sorted({str(i.group) for i in pairs})
    cfg = tiny(soup_regional_etch_px=3.0)
    made, _ = cv.trained(pairs, groups, cfg, tmp_path / "fold")
    plain, etched = cv.soup_ingredients(cfg).values()
    assert etched.augment.regional_etch_px == 3.0 and plain.soup_regional_etch_px == 0.0
    # Each ingredient is the recipe it names: the key an earlier plain or etched run checkpointed under.
    ingredients = tmp_path / "fold" / "ingredients"
    for name, recipe in (("plain", plain), ("regional-etch-3", etched)):
        meta = (ingredients / name / "trained.json").read_text()
        assert cv._key(recipe, groups) in meta
    assert cv._key(plain, groups) == cv._key(tiny(), groups)  # the soup field is left out at 0

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpointed ingredient was trained again")

    monkeypatch.setattr(cv, "train_on", refuse)
    again, _ = cv.trained(pairs, groups, cfg, tmp_path / "fold")
    for name, value in made.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    assert "soup_regional_etch_px" in config_dict(cfg) and "soup_regional_etch_px" not in config_dict(tiny())


def test_a_soup_without_folds_is_refused_with_the_value_found(pairs: list[Any]) -> None:
    from stream_service.training.train import train

    manifest = Path(pairs[0].frame).parent / "manifest.jsonl"
    with pytest.raises(InputError, match=r"soup_regional_etch_px: expected 0 .*found 3"):
        train(manifest, tiny(soup_regional_etch_px=3.0))
