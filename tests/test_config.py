"""Configs: field docs, generated CLI options, file + override precedence, type checking, JSON round trip."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from metarl.config import (
    ConfigError,
    add_dataclass_arguments,
    build_config,
    config_from_dict,
    config_to_dict,
    field_docs,
    overrides_from_namespace,
    save_config,
)


@dataclass(frozen=True)
class Inner:
    inner_lr: float = 0.1
    """Step size of the inner-loop update (100% plain SGD)."""
    steps: int = 1
    """Number of inner-loop gradient steps."""
    first_order: bool = False
    """Drop second-order terms of the meta-gradient."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class Train:
    env: str = "point-nav"
    """Task family to train on."""
    seed: int = 0
    """Seed of every random draw."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the policy."""
    goal: tuple[float, float] = (0.0, 1.0)
    """A fixed-length pair."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Torch device for rollouts and updates."""
    max_steps: int | None = None
    """Stop after this many env steps (none: no limit)."""
    cuda_graphs: bool = True
    """Capture rollouts in CUDA graphs."""
    maml: Inner = field(default_factory=lambda: Inner(steps=3))
    """MAML settings."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl train")
    parser.add_argument("--config", type=Path, default=None)
    add_dataclass_arguments(parser, Train)
    return parser


def _build(argv: list[str], file: Path | None = None) -> Train:
    args = _parser().parse_args(argv)
    return build_config(Train, file, overrides_from_namespace(args, Train))


def test_field_docs_are_read_from_source() -> None:
    docs = field_docs(Train)
    assert docs["seed"] == "Seed of every random draw."
    assert docs["maml"] == "MAML settings."
    assert field_docs(Inner)["steps"] == "Number of inner-loop gradient steps."


def test_help_lists_docstrings_defaults_and_nested_options() -> None:
    text = " ".join(_parser().format_help().split())
    assert "Hidden layer widths of the policy. (default: 64,64)" in text
    assert "--maml.inner-lr" in text and "Step size of the inner-loop update (100% plain SGD)." in text
    assert "--cuda-graphs, --no-cuda-graphs" in text
    assert "Number of inner-loop gradient steps. (default: 3)" in text  # Train's default Inner, not Inner's own
    assert "Stop after this many env steps (none: no limit). (default: none)" in text


def test_defaults_and_cli_values() -> None:
    assert _build([]) == Train()
    cfg = _build(["--hidden", "32,16,8", "--goal", "1,2", "--no-cuda-graphs", "--maml.inner-lr", "0.5",
                  "--maml.first-order", "--device", "cuda", "--max-steps", "1000"])
    assert cfg.hidden == (32, 16, 8) and cfg.goal == (1.0, 2.0) and cfg.cuda_graphs is False
    assert cfg.maml == Inner(inner_lr=0.5, steps=3, first_order=True)
    assert cfg.device == "cuda" and cfg.max_steps == 1000
    assert _build(["--max-steps", "none"]).max_steps is None
    assert _build(["--hidden", ""]).hidden == ()


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--hidden", "64,x"], ["--goal", "1,2,3"], ["--seed", "1.5"]])
def test_bad_cli_values_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_file_then_override_precedence(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"seed": 5, "env": "bandit", "hidden": [8], "maml": {"inner_lr": 0.2}}))
    else:
        path.write_text('seed = 5\nenv = "bandit"\nhidden = [8]\n[maml]\ninner_lr = 0.2\n')
    cfg = _build(["--seed", "9", "--maml.steps", "2"], path)
    assert (cfg.seed, cfg.env, cfg.hidden) == (9, "bandit", (8,))
    assert cfg.maml == Inner(inner_lr=0.2, steps=2)
    assert _build([], path).maml.steps == 3  # the field's own default, not Inner's class default


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"maml": {"inner_lrr": 0.1}}))
    with pytest.raises(ConfigError, match=r"maml\.inner_lrr.*valid keys: maml\.inner_lr, maml\.steps, maml\.first_order"):
        build_config(Train, path, {})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) sed; valid keys: env, seed, .*maml\.first_order"):
        build_config(Train, None, {"sed": 1})


@pytest.mark.parametrize(("data", "pattern"), [
    ({"seed": "3"}, r"'seed': got '3', expected int"),
    ({"seed": 1.5}, r"'seed': got 1.5, expected int"),
    ({"cuda_graphs": 1}, r"'cuda_graphs': got 1, expected bool"),
    ({"hidden": [64, "x"]}, r"'hidden\[1\]': got 'x', expected int"),
    ({"goal": [1.0]}, r"'goal': got \[1.0\], expected list of 2 float values"),
    ({"device": "tpu"}, r"'device': got 'tpu', expected one of 'cpu', 'cuda'"),
    ({"maml": 3}, r"'maml': expected a table"),
    ({"maml": {"steps": 0}}, r"'maml': steps must be >= 1, got 0"),
])
def test_bad_values_name_key_value_and_type(data: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(Train, data)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("seed = 1")
    (tmp_path / "b.json").write_text("{seed: 1")
    (tmp_path / "c.json").write_text("[1, 2]")
    for name, pattern in [("a.py", "expected a .json or .toml"), ("b.json", "not valid JSON"),
                          ("c.json", "top level"), ("missing.toml", "cannot read")]:
        with pytest.raises(ConfigError, match=pattern):
            build_config(Train, tmp_path / name, {})


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = Train(seed=4, hidden=(3,), max_steps=10, maml=Inner(inner_lr=0.3, first_order=True))
    data = config_to_dict(cfg)
    assert data["hidden"] == [3] and data["maml"]["inner_lr"] == 0.3
    path = tmp_path / "config.json"
    save_config(cfg, path)
    assert json.loads(path.read_text()) == data
    assert config_from_dict(Train, json.loads(path.read_text())) == cfg
    assert build_config(Train, path, {}) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
