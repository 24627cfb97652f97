"""Atomic, checksummed checkpoints that load without unpickling code.

File layout: the magic `METARL-CKPT\\n`, a little-endian header (format version u32, payload length u64,
SHA-256 of the payload), then the payload: the state dict written by `torch.save`. Loading checks the magic,
version, length and checksum before `torch.load(..., weights_only=True)` reads the payload.

Run directories hold numbered checkpoints `ckpt-{step:06d}.pt` (`checkpoint_path`); `step` is the trainer's
counter (e.g. the outer iteration), so the newest checkpoint is the highest-numbered one (`latest_checkpoint`)
and older ones can be removed (`prune_checkpoints`). Save a final or interrupted state as a numbered checkpoint
too; there is no separate `last.pt`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_MAGIC = b"METARL-CKPT\n"
_HEADER = struct.Struct("<IQ32s")  # version, payload length, sha256
_NAME = re.compile(r"ckpt-(\d+)\.pt")
#: Leaf types that `torch.load(weights_only=True)` accepts.
_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupted or not a metarl checkpoint."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`, never a mix.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and replace `path` with
    `os.replace`; the temporary file is removed if anything fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the directory entry of a just-replaced file (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Atomically write `state`: nested dicts/lists/tuples of tensors, numbers, strings, None, dtypes and devices.

    Raises TypeError naming the entry when `state` holds anything else (it could not be loaded safely).
    """
    _check_state(state, "state")
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    header = _HEADER.pack(FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    atomic_write_bytes(Path(path), _MAGIC + header + payload)


def _check_state(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"checkpoint {where}: key {key!r} must be a str or int")
            _check_state(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_state(item, f"{where}[{i}]")
    elif not isinstance(value, _LEAVES):
        raise TypeError(f"checkpoint {where}: {type(value).__name__} cannot be saved; use tensors, numbers, strings, "
                        "lists and dicts")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved by `save_checkpoint`, with tensors on `map_location`.

    Raises CheckpointError naming `path` when the file is missing, unreadable, truncated, corrupted, of an unknown
    format version, not a metarl checkpoint, or holds anything but plain data.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path}: no such file") from err
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({err.strerror or err})") from err
    payload = _verified_payload(path, data)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: payload could not be loaded as plain data: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: payload is a {type(state).__name__}, expected a dict")
    return state


def _verified_payload(path: Path, data: bytes) -> bytes:
    """The payload of checkpoint bytes `data`, after checking magic, version, length and checksum."""
    if not data.startswith(_MAGIC):
        what = "empty file" if not data else "missing the metarl checkpoint header"
        raise CheckpointError(f"checkpoint {path}: not a metarl checkpoint ({what})")
    start = len(_MAGIC) + _HEADER.size
    if len(data) < start:
        raise CheckpointError(f"checkpoint {path}: truncated inside the header ({len(data)} bytes)")
    version, length, digest = _HEADER.unpack_from(data, len(_MAGIC))
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {version}, this metarl reads version {FORMAT_VERSION}")
    payload = data[start:]
    if len(payload) != length:
        problem = "truncated" if len(payload) < length else "has trailing bytes"
        raise CheckpointError(f"checkpoint {path}: {problem}: payload is {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: SHA-256 mismatch, the file is corrupted")
    return payload


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives in `run_dir`: `ckpt-{step:06d}.pt`."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / f"ckpt-{step:06d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every numbered checkpoint in `run_dir`, oldest first (empty if `run_dir` is missing)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = ((_NAME.fullmatch(p.name), p) for p in run_dir.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m and p.is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-numbered checkpoint in `run_dir`, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int = 3) -> list[Path]:
    """Delete all but the `keep` highest-numbered checkpoints in `run_dir`; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"prune_checkpoints keeps at least 1 checkpoint, got keep={keep}")
    old = [p for _, p in list_checkpoints(run_dir)[:-keep]]
    for p in old:
        p.unlink(missing_ok=True)
    return old
