"""MuJoCo families: rewards and terminations as ../shared/ENVS.md defines them on Gymnasium's v5 envs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("mujoco")

import metarl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["HalfCheetahVel", "HalfCheetahDir", "AntVel", "AntDir", "AntGoal"]


def expected_reward(name: str, task: dict, raw: gym.Env, info: dict, action: np.ndarray) -> float:
    """ENVS.md's reward from the raw v5 env's velocity / position and its contact forces."""
    v_x = info["x_velocity"]
    if name.startswith("HalfCheetah"):
        ctrl = 0.05 * np.sum(action**2)
        return (-abs(v_x - task["goal_velocity"]) if name.endswith("Vel") else task["direction"] * v_x) - ctrl
    cost = 0.005 * np.sum(action**2) + 0.0005 * np.sum(np.clip(raw.unwrapped.data.cfrc_ext, -1, 1) ** 2)
    if name == "AntVel":
        return -abs(v_x - task["goal_velocity"]) + 1.0 - cost + 0.05
    if name == "AntDir":
        return task["direction"] * v_x - cost + 0.05
    xy = np.array([info["x_position"], info["y_position"]])
    return -np.sum(np.abs(xy - np.array(task["goal"]))) + 4.0 - cost + 0.05


@pytest.mark.parametrize("name", NAMES)
def test_rewards_and_terminations_follow_the_definitions(name):
    family = metarl.make_family(name)
    raw_id = "HalfCheetah-v5" if name.startswith("HalfCheetah") else "Ant-v5"
    rng = np.random.default_rng(0)
    for task in family.sample(2, 1).to_dicts():
        env, raw = family.make(task), gym.make(raw_id)
        obs, _ = env.reset(seed=3)
        raw_obs, _ = raw.reset(seed=3)
        np.testing.assert_array_equal(obs, raw_obs)
        for _ in range(40):
            action = rng.uniform(-1, 1, size=env.action_space.shape).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            raw_obs, _, raw_terminated, _, info = raw.step(action)
            np.testing.assert_array_equal(obs, raw_obs)
            assert reward == pytest.approx(expected_reward(name, task, raw, info, action), rel=1e-6, abs=1e-6)
            assert terminated == raw_terminated and not truncated
            if terminated:
                break


@pytest.mark.parametrize("name", NAMES)
def test_registered_everywhere_and_each_sub_env_has_its_task(name):
    family = metarl.make_family(name)
    assert metarl.make_family(f"metarl/{name}-v0") is family and family.horizon == 200
    assert metarl.make_family(name, horizon=100).horizon == 100
    env = gym.make(f"metarl/{name}-v0", horizon=50)
    assert env.unwrapped.horizon == 50
    tasks = family.sample(3, 0)
    vec = gym.make_vec(f"metarl/{name}-v0", num_envs=3, vectorization_mode="vector_entry_point", tasks=tasks)
    assert vec.sub_env_tasks() == tasks.to_dicts()
    key = family.param_names[0]
    assert [np.asarray(getattr(e.env, key)).tolist() for e in vec.envs.envs] == [t[key] for t in tasks.to_dicts()]


@pytest.mark.parametrize("name", ["HalfCheetahDir", "AntDir"])
def test_direction_families_sample_both_directions_from_separate_streams(name):
    family = metarl.make_family(name)
    assert not family.hash_splits and "coincide" in family.describe()["splits"]
    train, test = family.sample(40, 0, "train"), family.sample(40, 0, "test")
    assert set(train.params["direction"].tolist()) == {-1.0, 1.0}
    assert not torch.equal(train.params["direction"], test.params["direction"])
    with pytest.raises(ValueError, match="direction"):
        family.tasks_from({"direction": 0.5})


def test_bench_adapter_quick(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_adapter.py"), "--quick", "--out", str(out),
                           "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["num_envs"] for r in result["sizes"]] == [8, 32]
    assert all(r["raw_env_steps_per_s"] > 0 and r["adapter_env_steps_per_s"] > 0 for r in result["sizes"])
    assert "overhead" in md.read_text()


def test_halfcheetah_maml_quick(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "halfcheetah_maml.py"), "--quick", "--run-dir",
                           str(tmp_path / "run"), "--out", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["gradient_steps"]) == 4 and result["horizon"] == 10
    assert "-78.6" in md.read_text() and "metarl train --env half-cheetah-vel" in result["command"]
