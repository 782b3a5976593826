"""Which ``loss=`` option fits which retrain mode and kind of data, checked before any work is done.

=========  ============================  ==============================================================
option     runs in                       how
=========  ============================  ==============================================================
ce         head, finetune                confidence-weighted cross-entropy (soft targets: CE against them)
asl        head, finetune                asymmetric loss on one-hot (or soft) targets, weighted per sample
samtone    head, finetune                images vs a class table (finetune: initialised from the text
                                         tower's class prompts when the backbone has one, else the labeled
                                         class means), same-tower negatives (image-image, label-label);
                                         predicts by cosine to the table
simcse_pp  finetune                      CE on the labeled + pseudo-labeled images plus the SimCSE++
                                         unlabeled objective (off-dropout negatives + dimension-wise
                                         contrast) on the unlabeled images' two views; on frozen
                                         embeddings: adapt=simcse_pp
psl        multi-label data only         pick-some-labels on a dual encoder (DE head alone) over the pooled
                                         embeddings, faiss hard-negative labels (ssl_pipeline.multilabel.unidec)
unidec     multi-label data only         UniDEC: dual encoder + classifier trained together with PSL, faiss
                                         hard-negative labels refreshed during training
=========  ============================  ==============================================================

Multi-label data trains the multi-label recipe, whose ASL is set by ``multilabel.asl`` (the default
``loss=ce`` keeps it); ``loss=unidec`` / ``loss=psl`` replace its retrain step by the dual encoder.
Refusals are one line naming ``loss`` and the accepted options.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ssl_pipeline.errors import ConfigError

# _target_ class name -> (option name, retrain modes it runs in on single-label data)
FITS = {
    "ConfidenceWeightedCE": ("ce", ("head", "finetune")),
    "AsymmetricLoss": ("asl", ("head", "finetune")),
    "SamToNeLoss": ("samtone", ("head", "finetune")),
    "SimCSEPPLoss": ("simcse_pp", ("finetune",)),
    "PSLLoss": ("psl", ()),
    "UniDECLoss": ("unidec", ()),
}
MULTILABEL = {"PSLLoss": "psl", "UniDECLoss": "unidec"}  # dual-encoder losses of the multi-label retrain
WHY = {
    "SimCSEPPLoss": "an unlabeled objective that trains an encoder: retrain=head trains no encoder; "
                    "adapt=simcse_pp trains it on the frozen embeddings before cluster/pseudolabel",
    "PSLLoss": "a multi-label retrieval loss over label embeddings (pick-some-labels); no retrain mode here has a "
               "label tower",
    "UniDECLoss": "a multi-label dual-encoder + classifier loss; no retrain mode here has a label tower",
}


def accepted(mode: str) -> list[str]:
    """Option names that run in retrain ``mode`` on single-label data."""
    return [name for name, modes in FITS.values() if mode in modes]


def multilabel_loss(cfg: DictConfig) -> str | None:
    """``"unidec"`` / ``"psl"`` when ``cfg.loss`` is a dual-encoder loss of the multi-label retrain, else None."""
    target = str((cfg.get("loss") or {}).get("_target_", ""))
    return MULTILABEL.get(target.rsplit(".", 1)[-1])


def check_loss(cfg: DictConfig, multilabel: bool) -> None:
    """Raise :class:`ConfigError` (key ``loss``) when ``cfg.loss`` cannot run with ``cfg.retrain.mode`` / the data."""
    target = str((cfg.get("loss") or {}).get("_target_", ""))
    cls = target.rsplit(".", 1)[-1]
    if cls not in FITS:  # a user's own loss: called as loss(logits, labels, weights)
        return
    name, modes = FITS[cls]
    if multilabel:
        if name != "ce" and cls not in MULTILABEL:
            raise ConfigError("loss", f"loss={name} does not apply to multi-label data: the multi-label recipe trains "
                                      "with its own ASL (set multilabel.asl.gamma_neg / gamma_pos / clip); multi-label "
                                      "data accepts loss=ce (that recipe), unidec, psl")
        if cls in MULTILABEL:
            from ssl_pipeline.multilabel.unidec import loss_settings

            loss_settings(cfg)  # unknown or bad settings stop here
        return
    if cls in MULTILABEL:
        m = str(cfg.retrain.get("mode", "head"))
        raise ConfigError("loss", f"loss={name} runs on multi-label data only (a Y matrix: data=embeddings with X, Y, "
                                  "labeled; data=multilabel_csv; data=multilabel_demo); "
                                  f"retrain={m} accepts loss={', '.join(accepted(m))}")
    mode = str(cfg.retrain.get("mode", "head"))
    if mode not in modes:
        why = f" ({WHY[cls]})" if cls in WHY else ""
        raise ConfigError("loss", f"loss={name} does not run in retrain={mode}{why}; retrain={mode} accepts "
                                  f"loss={', '.join(accepted(mode))}" +
                          (f"; loss={name} runs in retrain={', '.join(modes)}" if modes else ""))


# settings of loss=simcse_pp read beside SimCSEPPLoss's own arguments (conf/loss/simcse_pp.yaml)
SIMCSE_DEFAULTS = {"weight": 1.0, "dropout": 0.1, "unlabeled_batch": 64}


def finetune_losses(cfg: DictConfig):
    """(supervised loss module or None = weighted CE, unlabeled objective or None) of ``cfg.loss`` in finetune.

    ``loss=simcse_pp``: the supervised loss is the default weighted CE; the unlabeled objective is
    ``{"loss": SimCSEPPLoss, "weight", "dropout", "unlabeled_batch"}`` (:data:`SIMCSE_DEFAULTS`).
    """
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    from ssl_pipeline.models.contrastive import SimCSEPPLoss

    lc = OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") is not None else {}
    if "_target_" not in lc:
        return None, None
    if not issubclass(get_class(lc["_target_"]), SimCSEPPLoss):
        return instantiate(cfg.loss), None
    extra = dict(SIMCSE_DEFAULTS)
    for k in SIMCSE_DEFAULTS:
        if k in lc:
            extra[k] = lc.pop(k)
    if not float(extra["weight"]) > 0:
        raise ConfigError("loss.weight", f"must be > 0, got {extra['weight']}")
    if not 0.0 <= float(extra["dropout"]) < 1.0:
        raise ConfigError("loss.dropout", f"must be in [0, 1), got {extra['dropout']}")
    if int(extra["unlabeled_batch"]) < 2:
        raise ConfigError("loss.unlabeled_batch", f"must be >= 2 (the dimension-wise term needs a batch), "
                                                  f"got {extra['unlabeled_batch']}")
    try:
        loss = instantiate(OmegaConf.create(lc))
    except Exception as e:  # an unknown key of the loss group
        raise ConfigError("loss", f"loss=simcse_pp: {str(e).splitlines()[0]}") from None
    return None, {"loss": loss, "weight": float(extra["weight"]), "dropout": float(extra["dropout"]),
                  "unlabeled_batch": int(extra["unlabeled_batch"])}
