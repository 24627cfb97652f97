"""The training loop around a learner: run directory, TensorBoard, progress bar, atomic checkpoints, resume."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from metarl import distributed
from metarl.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


class Learner(Protocol):
    """What the trainer drives (see `metarl.agents.maml_learner.MAMLLearner`)."""

    env_steps: int

    def train_iteration(self, iteration: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer:
    """Runs `learner.train_iteration` for iterations [start, total), logging to `run_dir`.

    Checkpoints (`ckpt-{iteration:06d}.pt`, written atomically) every `checkpoint_every` iterations, at the
    end, on Ctrl-C and when an iteration raises; `resume()` continues from the latest one. Every iteration's
    randomness derives from (seed, iteration), so a resumed run ends with the same parameters as an
    uninterrupted one. Scalars go to TensorBoard (`run_dir/tb`, keyed by environment steps) and to
    `run_dir/metrics.jsonl`. Under torch.distributed only rank 0 writes (logs, progress bar, checkpoints) and
    every rank loads the checkpoint on resume.
    """

    def __init__(self, learner: Learner, run_dir: str | Path, iterations: int, config: Mapping[str, Any] | None = None,
                 checkpoint_every: int = 10, keep_checkpoints: int = 3, progress: bool = True,
                 tensorboard: bool = True) -> None:
        if iterations < 0 or checkpoint_every < 1:
            raise ValueError(f"iterations must be >= 0 and checkpoint_every >= 1, got {iterations}, {checkpoint_every}")
        self.learner, self.run_dir, self.iterations = learner, Path(run_dir), iterations
        self.config = dict(config or {})
        self.checkpoint_every, self.keep = checkpoint_every, keep_checkpoints
        self.progress, self.tensorboard = progress, tensorboard
        self.iteration = 0
        self._wall_offset = 0.0
        self._start = time.perf_counter()

    def resume(self) -> int:
        """Loads the latest checkpoint of `run_dir`; returns the iteration to continue from."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.run_dir} (expected ckpt-NNNNNN.pt files)")
        state = load_checkpoint(path)
        self.learner.load_state_dict(state["learner"])
        self.iteration = int(state["iteration"])
        self._wall_offset = float(state.get("wall_time_s", 0.0))
        return self.iteration

    def save(self, barrier: bool = True) -> Path:
        """Rank 0 writes the checkpoint; with `barrier`, every rank waits until it is on disk."""
        path = checkpoint_path(self.run_dir, self.iteration)
        if distributed.is_main():
            save_checkpoint(path, {"iteration": self.iteration, "learner": self.learner.state_dict(),
                                   "config": self.config, "wall_time_s": self._wall()})
            prune_checkpoints(self.run_dir, self.keep)
        if barrier:
            distributed.barrier()
        return path

    def _wall(self) -> float:
        return self._wall_offset + time.perf_counter() - self._start

    def run(self) -> list[dict[str, float]]:
        """Trains to `iterations`; returns the metrics of the iterations run now."""
        main = distributed.is_main()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
        self._start = time.perf_counter()
        writer = self._writer() if main else None
        history: list[dict[str, float]] = []
        bar = tqdm(total=self.iterations, initial=self.iteration, disable=not (self.progress and main),
                   desc="meta-iterations", dynamic_ncols=True)
        try:
            while self.iteration < self.iterations:
                metrics = self.learner.train_iteration(self.iteration)
                self.iteration += 1
                metrics = {**metrics, "time/wall_s": self._wall(), "time/env_steps": float(self.learner.env_steps)}
                history.append(metrics)
                if main:
                    self._log(writer, metrics)
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k.startswith("adapt/")
                                 or k.startswith("incontext/return_trial")})
                if self.iteration % self.checkpoint_every == 0 or self.iteration == self.iterations:
                    self.save()
        except BaseException:  # Ctrl-C or a failing iteration: keep what was learned, then stop
            self.save(barrier=False)  # other ranks may be gone or stuck in a collective
            raise
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return history

    def _writer(self):
        if not self.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"), purge_step=self.learner.env_steps or None)

    def _log(self, writer, metrics: dict[str, float]) -> None:
        step = self.learner.env_steps
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": self.iteration, "env_steps": step, **metrics}) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drops metric lines written after the checkpoint (by the interrupted run)."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= self.iteration]
            path.write_text("".join(ln + "\n" for ln in lines))
