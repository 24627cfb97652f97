"""The `metarl` command line, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import metarl


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl", *args], capture_output=True, text=True, timeout=300)


def test_envs_lists_every_family_with_ranges():
    out = run("envs")
    assert out.returncode == 0, out.stderr
    for name in metarl.family_names():
        family = metarl.make_family(name)
        assert family.env_id in out.stdout
        for spec in family.params:
            assert f"param {spec.name}" in out.stdout
    rows = json.loads(run("envs", "--json").stdout)
    assert {r["name"] for r in rows} == set(metarl.family_names())
    assert all("train" in p and "test" in p for r in rows for p in r["params"].values())


def test_random_baseline_runs_and_is_seeded():
    a = run("random-baseline", "--env", "PointNav", "--num-tasks", "8", "--seed", "3")
    b = run("random-baseline", "--env", "point-nav", "--num-tasks", "8", "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert "PointNav" in a.stdout and a.stdout == b.stdout


def test_unknown_env_is_a_clear_error():
    out = run("random-baseline", "--env", "NoSuchEnv")
    assert out.returncode == 2
    assert "unknown task family 'NoSuchEnv'" in out.stderr and "PointNav" in out.stderr
