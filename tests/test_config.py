"""Config plumbing: unknown keys, field types and config files are checked with clear errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from l2o.config import Config, check_field_types, check_keys, read_config_file
from l2o.outer.meta_l2l import MetaL2LConfig
from l2o.outer.gps.conv_trainer import ConvGPSConfig


@dataclass
class Example:
    n: int = 1
    lr: float = 0.1
    flag: bool = False
    name: str = "x"
    path: str | None = None


@pytest.mark.parametrize(("field", "value"), [("n", True), ("n", 1.5), ("lr", math.nan), ("lr", "0.1"),
                                              ("flag", 1), ("name", ""), ("path", 3)])
def test_check_field_types_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"{field} = "):
        check_field_types(Example(**{field: value}), "example")


def test_check_field_types_accepts_good_values():
    check_field_types(Example(n=3, lr=2, flag=True, name="a", path="/p"), "example")


def test_check_keys_lists_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown example config key\(s\) \['typo'\]"):
        check_keys(Example, {"n": 1, "typo": 2}, "example")


def test_read_config_file_toml_json_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('horizon = 20\ntask = "digits:8-6:b16"\n')
    (tmp_path / "c.json").write_text('{"horizon": 30}')
    assert read_config_file(tmp_path / "c.toml", {"horizon": 40, "seed": None}) == {"horizon": 40, "task": "digits:8-6:b16"}
    assert read_config_file(tmp_path / "c.json") == {"horizon": 30}
    cfg = ConvGPSConfig.from_file(tmp_path / "c.toml", iterations=3)
    assert (cfg.horizon, cfg.iterations, cfg.task) == (20, 3, "digits:8-6:b16")


def test_meta_training_configs_reject_wrong_types():
    with pytest.raises(ValueError, match="episodes"):
        MetaL2LConfig(episodes=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_dir"):
        ConvGPSConfig(data_dir=5)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Validated(Config):
    n: int = 1
    lr: float = 0.1
    mode: str = "a"

    _label = "validated"

    def __post_init__(self) -> None:
        self.require(ge1=("n",), gt0=("lr",), choices={"mode": ("a", "b")})


@pytest.mark.parametrize(("field", "value"), [("n", 0), ("lr", 0.0), ("mode", "c")])
def test_config_require_names_the_config_and_the_field(field, value):
    with pytest.raises(ValueError, match=f"validated config: {field} must be"):
        Validated(**{field: value})


def test_config_from_dict_to_dict_and_unknown_keys():
    cfg = Validated.from_dict({"n": 3, "mode": "b"})
    assert Validated.from_dict(cfg.to_dict()) == cfg and cfg.to_dict() == {"n": 3, "lr": 0.1, "mode": "b"}
    with pytest.raises(ValueError, match=r"unknown validated config key\(s\) \['typo'\]"):
        Validated.from_dict({"typo": 1})
