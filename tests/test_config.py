"""Config composition: schemas reject unknown keys, groups compose, overrides apply."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

BAD = (ConfigCompositionException, ConfigKeyError, ValidationError)


def test_default_config_composes(compose):
    cfg = compose()
    assert cfg.stage.name == "sft"
    assert cfg.model.vision.type == "siglip"
    assert set(cfg.stage.mixture) <= set(cfg.data.datasets)


@pytest.mark.parametrize("stage", ["lm_pretrain", "align", "sft"])
def test_stage_configs_compose(compose, stage):
    cfg = compose(f"stage={stage}")
    assert cfg.stage.name == stage
    assert set(cfg.stage.mixture) <= set(cfg.data.datasets)


def test_stage_trainable_parts(compose):
    align = compose("stage=align").stage.trainable
    assert (align.vision, align.projector, align.lm) == (False, True, False)
    lm = compose("stage=lm_pretrain").stage.trainable
    assert (lm.vision, lm.projector, lm.lm) == (False, False, True)


def test_override_applies(compose):
    assert compose("stage.optim.lr=0.5").stage.optim.lr == 0.5


@pytest.mark.parametrize(
    "override", ["stage.bogus=1", "model.vision.bogus=1", "trainer.bogus=1", "data.bogus=1"]
)
def test_unknown_key_on_command_line_fails(compose, override):
    with pytest.raises(BAD, match="bogus"):
        compose(override)


def test_wrong_type_fails(compose):
    with pytest.raises(BAD, match="max_steps"):
        compose("stage.max_steps=many")


def test_unknown_key_in_yaml_fails(compose, tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "bad.yaml").write_text(
        "name: bad\nmixture: {vqa: 1.0}\nlearning_rate: 1e-3\n"
    )
    with pytest.raises(BAD, match="learning_rate"):
        compose("stage=bad", f"hydra.searchpath=[file://{tmp_path}]")
