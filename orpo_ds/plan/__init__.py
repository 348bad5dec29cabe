"""Capacity planning: will a config fit on a cluster shape, and how long will it take (``orpo-ds plan``).

Inside the package: ``shapes`` (the model, on the meta device) -> ``memory`` (bytes per GPU, term by
term) and ``timing`` (FLOPs and traffic); ``experts`` (a mixture of experts: active and held parameters,
ZeRO-3's gathers, an expert-parallel what-if); ``rows`` (the packed rows of the data); ``planner`` puts them
together for a cluster; ``render`` writes the report.
"""

from orpo_ds.plan.planner import Cluster, Plan, make_plan

__all__ = ["Cluster", "Plan", "make_plan"]
