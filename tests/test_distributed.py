"""Multi-process training: task shards, shard-invariant rollouts, and 2 gloo processes == 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from metarl import distributed
from metarl.agents.mlp import MLPConfig, MLPPolicy
from metarl.checkpoint import latest_checkpoint, load_checkpoint
from metarl.config import build_config
from metarl.family import make_family
from metarl.rollout import collect, make_rollout_env
from metarl.train import TrainConfig, run_training

TINY = {"env": "PointNav", "env_options": "horizon=10", "agent": "maml-mlp", "iterations": 2, "checkpoint_every": 1,
        "eval_tasks": 2, "eval_steps": 1, "progress": False, "batch.meta_batch": 4, "batch.trajectories_per_task": 2,
        "mlp.hidden": (16, 16)}
# TRPO with damping 0.1: the Fisher of these tiny runs is nearly singular, and with the default damping (1e-5) conjugate
# gradient amplifies float32 rounding (already a different summation order in one process changes its direction)
CASES = {"trpo": {"outer.cg_damping": 0.1}, "ppo": {"outer.method": "ppo", "outer.ppo_epochs": 2},
         "incontext": {"agent": "incontext-transformer", "incontext.meta_batch": 4, "incontext.trials_per_task": 2,
                       "incontext.episodes_per_trial": 2, "incontext.minibatches": 4, "incontext.epochs": 2,
                       "transformer.d_model": 16, "transformer.n_heads": 2, "transformer.context": 20}}


def tiny(**overrides) -> TrainConfig:
    return build_config(TrainConfig, None, {**TINY, **overrides})


def final_policy(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))["learner"]["policy"]


def test_shards_partition_the_meta_batch_into_distinct_rank_ranges():
    for total, world in ((4, 2), (20, 3), (5, 5)):
        shards = [distributed.shard_of(total, r, world) for r in range(world)]
        assert shards[0].start == 0 and shards[-1].stop == total
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
        assert sum(s.weight for s in shards) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="meta_batch >= 3"):
        distributed.shard_of(2, 0, 3)


def test_one_process_helpers_are_identity_and_free():
    x = torch.arange(3.0)
    assert distributed.world_size() == 1 and distributed.is_main() and not distributed.is_distributed()
    assert distributed.allreduce_sum(x) is x and distributed.allreduce_max(x) is x
    assert distributed.weighted_metrics({"a": 2.0}, 0.5) == {"a": 2.0}
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert distributed.broadcast_object([1]) == [1]


@pytest.mark.parametrize("env_name,episodes", [("PointNav", 1), ("TabularMDP", 2), ("PendulumVar", 2)])
def test_sharded_collect_equals_the_rows_of_a_full_batch_collect(env_name, episodes):
    family = make_family(env_name)
    tasks = family.sample(4, 3, "train")
    torch.manual_seed(0)
    policy = MLPPolicy(family.observation_space, family.action_space, MLPConfig(hidden=(8,)))
    full = collect(policy, make_rollout_env(family, tasks, 2), num_tasks=4, episodes_per_trial=episodes, seed=11)
    shard = distributed.Shard(1, 3, 4)
    part = collect(policy, make_rollout_env(family, tasks[1:3], 2), num_tasks=2, episodes_per_trial=episodes, seed=11,
                   shard=shard)
    for name in ("obs", "actions", "rewards", "valid", "log_probs"):
        assert torch.equal(getattr(part, name), getattr(full, name)[1:3]), name


def _terminating_setup():
    """CartPoleVar (episodes end early, at different steps per task), 4 tasks, a small MLP policy."""
    family = make_family("CartPoleVar")
    torch.manual_seed(0)
    return family, family.sample(4, 3, "train"), MLPPolicy(family.observation_space, family.action_space,
                                                         MLPConfig(hidden=(8,)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    """One gloo rank: the equivalence runs of both outer methods, then a 2-rank interrupted-and-resumed run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import metarl.train as train

    learners = []
    make = train.make_learner
    train.make_learner = lambda config: learners.append(make(config)) or learners[-1]
    base = Path(root)
    try:
        distributed.init_distributed("cpu")
        shard = distributed.shard_of(4)
        family, tasks, policy = _terminating_setup()
        part = collect(policy, make_rollout_env(family, tasks[shard.start:shard.stop], 2), num_tasks=len(shard),
                       episodes_per_trial=2, seed=11, shard=shard)
        torch.save({"actions": part.actions * part.valid, "valid": part.valid}, base / f"collect-rank{rank}.pt")
        for name, case in CASES.items():
            result = run_training(tiny(**case), base / f"dist-{name}")
            assert rank == 0 or not result  # rank 0 alone evaluates
            torch.save(learners[-1].policy.state_dict(), base / f"dist-{name}-rank{rank}.pt")
        run_training(tiny(**CASES["trpo"], iterations=1), base / "dist-resumed")
        run_training(tiny(**CASES["trpo"]), base / "dist-resumed", resume=True)
        torch.save(learners[-1].policy.state_dict(), base / f"dist-resumed-rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_two_gloo_processes_equal_one_process_for_trpo_ppo_and_incontext(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, case in CASES.items():
        run_training(tiny(**case), tmp_path / f"single-{name}")
        single, multi = final_policy(tmp_path / f"single-{name}"), final_policy(tmp_path / f"dist-{name}")
        rank1, initial = torch.load(tmp_path / f"dist-{name}-rank1.pt"), make_initial(name)
        for k in single:
            assert torch.allclose(multi[k], single[k], atol=1e-5, rtol=0), (name, k, (multi[k] - single[k]).abs().max())
            assert torch.equal(rank1[k], multi[k]), (name, k)  # every rank holds the same parameters
        assert any(not torch.equal(multi[k], initial[k]) for k in multi), name  # training moved them
        lines = (tmp_path / f"dist-{name}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["iteration"] for x in lines] == [1, 2]  # rank 0 alone logs
        single_steps = load_checkpoint(latest_checkpoint(tmp_path / f"single-{name}"))["learner"]["env_steps"]
        assert load_checkpoint(latest_checkpoint(tmp_path / f"dist-{name}"))["learner"]["env_steps"] == single_steps
        event_files = [len(list((tmp_path / f"{kind}-{name}" / "tb").iterdir())) for kind in ("single", "dist")]
        assert event_files[0] == event_files[1] >= 1
    family, tasks, policy = _terminating_setup()  # episodes of one shard end earlier than those of the other
    full = collect(policy, make_rollout_env(family, tasks, 2), num_tasks=4, episodes_per_trial=2, seed=11)
    parts = [torch.load(tmp_path / f"collect-rank{r}.pt") for r in range(2)]
    assert torch.equal(torch.cat([p["valid"] for p in parts]), full.valid)
    assert torch.equal(torch.cat([p["actions"] for p in parts]), full.actions * full.valid)  # padding steps aside
    resumed, uninterrupted = final_policy(tmp_path / "dist-resumed"), final_policy(tmp_path / "dist-trpo")
    rank1 = torch.load(tmp_path / "dist-resumed-rank1.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) and torch.equal(rank1[k], resumed[k]) for k in resumed)


def make_initial(name: str) -> dict[str, torch.Tensor]:
    from metarl.train import make_learner

    return make_learner(tiny(**CASES[name])).policy.state_dict()


def test_torchrun_cli_trains_with_two_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    run_dir = tmp_path / "run"
    flags = ["--env", "point-nav", "--env-options", "horizon=10", "--agent", "maml-mlp", "--iterations", "1",
             "--batch.meta-batch", "4", "--batch.trajectories-per-task", "2", "--mlp.hidden", "16", "--eval-tasks",
             "2", "--eval-steps", "1", "--no-progress", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "metarl",
                          "train", *flags], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run directory:") == 1 and "(2 processes)" in out.stdout
    assert load_checkpoint(latest_checkpoint(run_dir))["iteration"] == 1
    assert (run_dir / "eval.json").exists()


def test_bench_distributed_quick(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_distributed.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--processes", "2", "--out", str(out), "--markdown",
                           str(md)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["runs"]
    assert row["processes"] == 2 and row["iterations_per_s"] > 0
    assert row["allreduce_calls_per_iteration"] > 0 and row["allreduce_bytes_per_iteration"] >= 4 * row["policy_parameters"]
    assert "all-reduce" in md.read_text()
