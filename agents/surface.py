"""`SB3Surface`: the Stable-Baselines3-style methods both learners share, delegating to `metarl.agents.api`."""

from __future__ import annotations


class SB3Surface:
    """`learn`, `save`, `load` and `predict` for a learner class (see `metarl.agents.api`)."""

    def learn(self, iterations: int, callback=None, progress_bar: bool = False):
        """Trains `iterations` more meta-iterations; see `metarl.agents.api.learn`."""
        from .api import learn

        return learn(self, iterations, callback, progress_bar)

    def save(self, path) -> None:
        """Writes the learner to one file; `<LearnerClass>.load(path)` rebuilds it."""
        from .api import save

        save(self, path)

    @classmethod
    def load(cls, path, device="cpu", family=None):
        """The learner saved at `path` (`family`: its task family, needed when that is not registered by name);
        raises TypeError if it is another learner class."""
        from .api import load

        learner = load(path, device, family)
        if not isinstance(learner, cls):
            raise TypeError(f"{path} holds a {type(learner).__name__}, not a {cls.__name__}")
        return learner

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False, reward=None,
                params=None):
        """Actions for a batch of observations, carrying the history in `state`; see `metarl.agents.api.predict`."""
        from .api import predict

        return predict(self, observation, state, episode_start, deterministic, reward, params)
