"""Task families shipped with metarl; importing this package registers them (also with Gymnasium)."""

from metarl.envs import point_nav

from metarl.gym_registration import register_gymnasium

_BUILTIN = {
    "PointNav": "metarl.envs.point_nav:PointNavEnv",
}

for _name, _entry in _BUILTIN.items():
    register_gymnasium(_name, f"metarl/{_name}-v0", _entry)

__all__ = ["point_nav"]
