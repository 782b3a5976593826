"""Adaptation of frozen embeddings before cluster/pseudolabel (``adapt=`` config group).

* ``adapt=none`` (default): the cluster stage and the labelers see the encode stage's embeddings.
* ``adapt=simcse_pp``: :class:`SimCSEPPAdapter`, a residual projection trained on every training
  row (labels unused) with the SimCSE++ objective; the labelers see its output.
"""

from ssl_pipeline.adapt.simcse import ResidualProjection, SimCSEPPAdapter

__all__ = ["ResidualProjection", "SimCSEPPAdapter"]
