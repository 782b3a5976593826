"""Multi-label images: context-aware semantic alignment (CSA) and class-aware pseudo-labels (CAP).

==============  ==================================================================
module          what it does
==============  ==================================================================
``features``    spatial tokens + pooled embeddings (the encode stage on multi-label data)
``head``        the alignment head: label-specific attention features, one-to-one alignment
``contexts``    label contexts by spectral clustering of the labeled co-occurrence matrix
``thresholds``  class-aware (frequency-quantile) thresholds with a masked uncertain band
``pseudo``      teacher scores -> kNN vote -> thresholds -> context veto
``train``       Lightning training, labeled-only or with refreshed pseudo-labels (EMA teacher)
``labeler``     :class:`CSALabeler`, the pseudolabel stage's multi-label labeler (``_target_``)
``recipe``      the pseudolabel / retrain stages' multi-label steps and the run-directory exports
``settings``    ``cfg.multilabel`` over DEFAULTS; macro mAP; token PCA
==============  ==================================================================
"""
