"""N Ray actors of one class, each in its own placement bundle: the one shape of every actor group.

The rollout workers and the learner ranks are both a list of actors that the driver calls all at
once (every rank saves a checkpoint), one shard each (a batch split over the ranks), or one of
(a restarted worker is waited for). Every call has the group's timeout, and a dead actor surfaces
as ``DEAD`` for the group that owns it to turn into its own error.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Callable, Sequence, TypeVar

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)
T = TypeVar("T")


def concurrently(*starts: Callable[[], T]) -> list[T]:
    """Independent start-ups at once: the reward pool, the rollout workers and the learner ranks each
    spend their start mostly waiting on new processes and model loads, so started one after the other
    their waits add up. The results in order; every call has ended before the first failure (in the
    order given) is raised."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = [pool.submit(start) for start in starts]
        wait_futures(futures)
    for future in futures:
        if future.exception() is not None:
            raise future.exception()
    return [future.result() for future in futures]


class ActorGroup:
    def __init__(self, actor_class: Any, count: int, args: Callable[[int], Sequence[Any]],
                 options: Callable[[int], dict[str, Any]], timeout_s: float) -> None:
        """``args(i)`` and ``options(i)`` give actor i's constructor arguments and Ray options (its
        resources, its placement bundle, its restarts)."""
        remote = actor_class if isinstance(actor_class, ray.actor.ActorClass) else ray.remote(actor_class)
        self.timeout_s = timeout_s
        self.actors = [remote.options(**options(i)).remote(*args(i)) for i in range(count)]

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, index: int) -> Any:
        return self.actors[index]

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """The same call on every actor; the references, in actor order."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def submit_each(self, method: str, per_actor: Sequence[Sequence[Any]]) -> list[ray.ObjectRef]:
        """Actor i gets ``per_actor[i]`` (a shard); one entry per actor."""
        if len(per_actor) != len(self.actors):
            raise ValueError(f"{len(per_actor)} argument lists for {len(self.actors)} actors")
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_actor)]

    def get(self, refs: Any, timeout_s: float | None = None) -> Any:
        return ray.get(refs, timeout=self.timeout_s if timeout_s is None else timeout_s)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self.get(self.submit(method, *args, **kwargs))

    def call_each(self, method: str, per_actor: Sequence[Sequence[Any]]) -> list[Any]:
        return self.get(self.submit_each(method, per_actor))

    def wait_alive(self, index: int, probe: str = "ready", poll_s: float = 30.0, timeout_s: float | None = None) -> Any:
        """Wait for actor ``index`` to answer ``probe`` again (Ray restarts a dead one); gives up after
        ``timeout_s`` (the group's timeout by default) with the last error."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                return ray.get(getattr(self.actors[index], probe).remote(),
                               timeout=max(0.1, min(poll_s, deadline - time.monotonic())))
            except (*DEAD, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self, restart: bool = False) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=not restart)
            except ValueError:  # an actor already gone for good
                pass
        self.actors = []
