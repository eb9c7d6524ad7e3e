"""Scheduling policies, pure (docs/design.md §3): no Redis, no torch, no scikit-learn.

* :mod:`shared.policy.presets` -- the named presets and the traits derived from them
  (dependency-free, for every service),
* :mod:`shared.policy.config` -- :class:`~shared.policy.config.PolicyConfig`, the batching
  and offloading registries, dispatch caps,
* :mod:`shared.policy.types` -- what a cycle sees and decides (candidates, instances, plans),
* :mod:`shared.policy.batching` / :mod:`shared.policy.offloading` -- the algorithms,
* :mod:`shared.policy.planning` -- one cycle, :func:`~shared.policy.planning.plan_cycle`,
* :mod:`shared.policy.costmodel` -- evaluating an instance's time and memory model (numpy).
"""
