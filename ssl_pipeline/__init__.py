"""ssl_pipeline: semi-supervised learning on CLIP embeddings (``python -m ssl_pipeline``)."""


def load_model(path, device="cpu"):
    """An exported model folder (``<run dir>/model``) as a torch module with ``predict_proba(images)``.

    See :func:`ssl_pipeline.model.load.load_model`; torch is imported only when this is called.
    """
    from ssl_pipeline.model.load import load_model as _load

    return _load(path, device)
