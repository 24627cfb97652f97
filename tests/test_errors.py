"""Bad input gets an error that names the value and what was expected."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import metarl


@pytest.fixture
def nav():
    family = metarl.make_family("PointNav")
    return family, family.make_vec(family.sample(4, 0))


def test_unknown_family_lists_known_ones():
    with pytest.raises(KeyError, match="PointNav"):
        metarl.make_family("NoSuchEnv")


def test_unknown_family_option():
    with pytest.raises(TypeError, match="horizon"):
        metarl.make_family("PointNav", horizn=5)


def test_action_wrong_shape(nav):
    _, vec = nav
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*expected \(4, 2\)"):
        vec.step(torch.zeros(3, 2))


def test_action_wrong_dtype(nav):
    _, vec = nav
    vec.reset(seed=0)
    with pytest.raises(TypeError, match="floating dtype.*int64"):
        vec.step(torch.zeros(4, 2, dtype=torch.long))


def test_action_non_finite(nav):
    _, vec = nav
    vec.reset(seed=0)
    action = torch.zeros(4, 2)
    action[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite action for sub-env\(s\) \[2\]"):
        vec.step(action)


def test_action_wrong_device(nav):
    _, vec = nav
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="meta"):
        vec.step(torch.zeros(4, 2, device="meta"))


def test_single_env_bad_actions():
    env = gym.make("metarl/PointNav-v0").unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        env.step(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([np.inf, 0.0], dtype=np.float32))


def test_task_outside_declared_range():
    family = metarl.make_family("PointNav")
    with pytest.raises(ValueError, match=r"goal=\[5.0, 0.0\].*outside the declared ranges"):
        family.make({"goal": (5.0, 0.0)})


def test_task_of_wrong_family():
    nav = metarl.make_family("PointNav")
    foreign = metarl.Tasks("Other", {"goal": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="'Other', not 'PointNav'"):
        nav.make_vec(foreign)
    with pytest.raises(ValueError, match=r"keys \['length'\], expected \['goal'\]"):
        nav.make({"length": 1.0})


def test_bad_split_and_n():
    family = metarl.make_family("PointNav")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        family.sample(3, 0, "val")
    with pytest.raises(ValueError, match="positive int"):
        family.sample(0, 0)


def test_reset_mask_shape(nav):
    _, vec = nav
    with pytest.raises(ValueError, match=r"reset_mask.*\(4,\)"):
        vec.reset(options={"reset_mask": torch.ones(3, dtype=torch.bool)})
