"""The search: per-channel penalties, when and what to shrink, and the shrink itself.

Owns: ``registry`` (prunable branches, penalties, masks), ``budget`` (a latency target), ``masks`` (keep-masks
and what the latency model says of them), ``driver`` (the :class:`Search` state and its decisions), ``surgery``
(compress by mask, state carried over), ``shrink`` (the pipeline every rank runs), ``board`` (TensorBoard).
May import config, models, latency, and parallel (collectives, re-wrap); never train.
"""
from dist_hrnas.search.driver import Search
from dist_hrnas.search.shrink import after_eval

__all__ = ["Search", "after_eval"]
