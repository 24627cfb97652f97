"""Checkpoints: exact round trip of training state, rejection of damaged or unsafe files, atomic saves."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import pytest
import torch

from metarl import checkpoint as ckpt
from metarl.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

_EXECUTED: list[str] = []


def _mark_executed(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class _Payload:
    """Unpickling this calls `_mark_executed`: a stand-in for code hidden in a pickle."""

    def __reduce__(self) -> tuple:
        return _mark_executed, ("unpickled",)


def _training_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).pow(2).mean().backward()
    opt.step()
    gen = torch.Generator().manual_seed(123)
    torch.rand(7, generator=gen)
    return model, opt, gen


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def _frame(payload: bytes) -> bytes:
    """`payload` wrapped in a valid checkpoint header (correct length and checksum)."""
    header = ckpt._HEADER.pack(ckpt.FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    return ckpt._MAGIC + header + payload


def test_round_trip_restores_model_optimizer_and_generator(tmp_path: Path) -> None:
    model, opt, gen = _training_state()
    config = {"lr": 0.01, "hidden": [4], "name": "run", "maml": {"steps": 1}}
    path = tmp_path / "ckpt-000007.pt"
    save_checkpoint(path, {"model": model.state_dict(), "optim": opt.state_dict(), "rng": gen.get_state(),
                           "iteration": 7, "config": config})
    state = load_checkpoint(path)
    assert state["iteration"] == 7 and state["config"] == config

    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1.0)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    gen2 = torch.Generator()
    gen2.set_state(state["rng"])
    assert torch.equal(torch.rand(5, generator=gen2), torch.rand(5, generator=gen))

    x = torch.randn(6, 3)
    _step(model, opt, x)
    _step(model2, opt2, x)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "plain_torch_save", "bad_version"])
def test_damaged_files_raise(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "ckpt-000001.pt"
    save_checkpoint(path, {"w": torch.arange(1000.0), "step": 1})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    elif damage == "plain_torch_save":
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buffer)
        data = bytearray(buffer.getvalue())
    elif damage == "bad_version":
        data[len(ckpt._MAGIC)] = 99
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"x": _Payload()}))
    framed = tmp_path / "framed.pt"
    buffer = io.BytesIO()
    torch.save({"x": _Payload()}, buffer)  # a well-formed checkpoint whose payload hides a callable
    framed.write_bytes(_frame(buffer.getvalue()))
    _EXECUTED.clear()
    with pytest.raises(CheckpointError, match="not a metarl checkpoint"):
        load_checkpoint(raw)
    with pytest.raises(CheckpointError, match="plain data"):
        load_checkpoint(framed)
    assert _EXECUTED == []


def test_missing_file_and_unsafe_state(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(TypeError, match=r"state\['opts'\]\['obj'\]"):
        save_checkpoint(tmp_path / "x.pt", {"opts": {"obj": object()}})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fail", ["replace", "write"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str) -> None:
    path = tmp_path / "ckpt-000001.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt.os, "replace" if fail == "replace" else "fsync", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"step": 2, "w": torch.ones(100)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_latest_and_prune(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (5, 100, 20, 1_000_000, 3):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "ckpt-latest.pt").write_text("not numbered")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-1000000.pt"
    assert checkpoint_path(tmp_path, 20).name == "ckpt-000020.pt"
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt-000003.pt", "ckpt-000005.pt", "ckpt-000020.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000100.pt", "ckpt-1000000.pt", "ckpt-latest.pt", "notes.txt"]
    with pytest.raises(ValueError, match="keep=0"):
        prune_checkpoints(tmp_path, keep=0)


def test_loads_onto_map_location(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(2)})
    assert load_checkpoint(path, map_location=torch.device("cpu"))["w"].device.type == "cpu"
