"""retrain.mode=finetune: the open_clip image tower plus a head trained on the images with Lightning.

Frozen, last-N-blocks or full fine-tuning (:class:`~ssl_pipeline.models.module.FinetuneModule`),
weak augmentation, optional FixMatch consistency on unlabeled images, optional weight EMA,
``retrain.rounds`` rounds of retrain -> re-encode -> re-label. Lightning checkpoints go to
``<run_dir>/retrain/<phase>/checkpoints``; ``retrain.resume=true`` (or a run directory / ``.ckpt``
path) continues an interrupted run to the same final metrics (:mod:`ssl_pipeline.retrain.resume`).
Runs on ``cfg.trainer`` (``trainer=ddp trainer.devices=N``: gloo on CPU).

Objectives (``loss=``): ce / asl on the head's logits; samtone, the embeddings against a class table (the cosine
head's rows, started at the text tower's class prompts when the backbone has one, else at the labeled class
means); simcse_pp, CE plus the SimCSE++ term on the unlabeled images (:class:`~ssl_pipeline.models.module.
FinetuneModule`).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import ArtifactCache, atomic_save_npy, stable_hash, write_json
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.engine import make_trainer
from ssl_pipeline.engine import rank as _rank
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.retrain.common import filter_pseudo, make_logger, select_training, soft_targets, test_positions
from ssl_pipeline.retrain.resume import ResumePlan
from ssl_pipeline.stages.encode import EmbeddingStore

log = logging.getLogger(__name__)


class Finetuner:
    """One finetune retrain: the view bank, the phases (labeled_only, round1..N) and their evaluation."""

    def __init__(self, cfg: DictConfig, table: SampleTable, store: EmbeddingStore, cache: ArtifactCache,
                 key: str, run_dir: Path):
        from ssl_pipeline.backbones import load_backbone
        from ssl_pipeline.models.finetune import RowImages, make_transforms

        self.cfg, self.rcfg, self.table, self.store, self.cache, self.key = cfg, cfg.retrain, table, store, cache, key
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "retrain"
        self.seed = int(cfg.seed)
        self.tcfg = OmegaConf.to_container(cfg.trainer, resolve=True) if "trainer" in cfg else None
        rc = self.rcfg
        self.tower_cfg = rc.get("tower", {}) or {}
        self.backbone = load_backbone(cfg.backbone, device="cpu")
        self.backbone.model.to(memory_format=torch.channels_last)
        self.pristine = copy.deepcopy(self.backbone.model.visual).cpu()
        self.n_classes = len(table.classes)
        aug = rc.get("augment", {}) or {}
        self.transforms = make_transforms(self.backbone.preprocess, self.backbone.image_size,
                                          int(aug.get("strong_ops", 2)), int(aug.get("strong_magnitude", 10)))
        self.images = RowImages(table, self.backbone.image_size, int(rc.get("preload_max", 10000)))
        cons = rc.get("consistency", {}) or {}
        self.consistency = bool(cons.get("enabled", False))
        from ssl_pipeline.models.module import loss_kind
        from ssl_pipeline.retrain.options import finetune_losses

        self.loss, self.unsup = finetune_losses(cfg)
        self.contrastive = self.loss is not None and loss_kind(self.loss) == "contrastive"
        if self.contrastive and rc.get("head", "linear") == "mlp":
            raise ConfigError("retrain.head", "loss=samtone trains the image embeddings against a class table and "
                                              "predicts by cosine to it: use retrain.head=linear or cosine")
        self.class_text = self._class_text(cfg) if self.contrastive else None
        self.extra_callbacks = [instantiate(c) for c in (rc.get("callbacks") or [])]
        self.plan = ResumePlan(rc.get("resume", False), self.root, key)
        probe = self.new_net()
        self.cached = probe.can_cache and int(self.tower_cfg.get("cache_views", 0)) > 0
        self.frozen_blocks = probe.frozen_blocks
        self.trainable_params = probe.trainable_parameters()
        self.total_params = sum(p.numel() for p in probe.parameters())
        self.bank = None

    # -- building blocks ---------------------------------------------------------------------
    def new_net(self, init_from=None):
        from ssl_pipeline.models.finetune import FinetuneNet, mix_seed

        rc, t = self.rcfg, self.tower_cfg
        torch.manual_seed(mix_seed(self.seed, 17))
        net = FinetuneNet(copy.deepcopy(self.pristine), self.n_classes, self.backbone.embed_dim,
                          head="cosine" if self.contrastive else rc.get("head", "linear"),
                          hidden=int(rc.get("hidden", 512)),
                          dropout=float(rc.get("dropout", 0.0)), train_mode=str(t.get("train", "partial")),
                          unfreeze_last=int(t.get("unfreeze_last", 2)))
        if init_from is not None:
            net.load_state_dict(init_from.state_dict())
        return net

    def _class_text(self, cfg) -> torch.Tensor | None:
        """(C, D) class-prompt embeddings of the backbone's text tower (``encode.text_templates`` averaged), or None
        when it has no trained text tower, the classes have no names or the text space is not the image space."""
        b, classes = self.backbone, list(self.table.classes)
        if not (b.has_text and classes):
            return None
        templates = list(cfg.encode.get("text_templates", ["a photo of a {}."]))
        prompts = [t.format(c.replace("_", " ")) for c in classes for t in templates]
        with torch.no_grad():
            T = b.encode_texts(prompts).reshape(len(classes), len(templates), -1).mean(1).cpu()
        return torch.nn.functional.normalize(T, dim=-1) if T.shape[1] == b.embed_dim else None

    def opt(self) -> dict:
        rc, t = self.rcfg, self.tower_cfg
        cons = rc.get("consistency", {}) or {}
        un = self.unsup or {}
        return {"steps": int(rc.steps), "batch_size": int(rc.batch_size),
                "labeled_fraction": float(rc.get("labeled_fraction", 0.25)),
                "unlabeled_batch": int(cons.get("unlabeled_batch", 64)) if self.consistency
                else int(un.get("unlabeled_batch", 0)),
                "simcse_weight": float(un.get("weight", 0.0)), "simcse_dropout": float(un.get("dropout", 0.0)),
                "consistency_weight": float(cons.get("weight", 1.0)) if self.consistency else 0.0,
                "threshold": float(cons.get("threshold", 0.95)),
                "lr": float(rc.lr), "backbone_lr": float(rc.get("backbone_lr", rc.lr)),
                "weight_decay": float(rc.weight_decay), "layer_decay": float(t.get("layer_decay", 1.0)),
                "warmup": float(rc.get("warmup", 0.05)), "ema": float(rc.get("ema", 0.0) or 0.0),
                "num_workers": int(rc.get("num_workers", 0))}

    def build_bank(self, train_rows: np.ndarray, test_rows: np.ndarray) -> None:
        """The frozen-prefix outputs of the clean view of every row and V weak (+ V strong) views of train rows."""
        from ssl_pipeline.models.finetune import BankItems, ViewBank
        from ssl_pipeline.stages.predict_writer import predict_arrays

        V = int(self.tower_cfg.get("cache_views", 8))
        S = V if (self.consistency or self.unsup) else 0  # strong views: FixMatch, or SimCSE++ positives
        aug = OmegaConf.to_container(self.rcfg.get("augment", {}) or {}, resolve=True)
        bkey = self.cache.key("retrain_bank", {
            "encode": self.store.path.name, "backbone": OmegaConf.to_container(self.cfg.backbone, resolve=True),
            "train": str(self.tower_cfg.get("train", "partial")), "frozen_blocks": self.frozen_blocks,
            "views": V, "strong": S, "aug": aug, "seed": self.seed, "train_rows": stable_hash(train_rows.tolist()),
            "test_rows": stable_hash(test_rows.tolist())})
        path = self.cache.path("retrain_bank", bkey)
        t0 = time.perf_counter()
        if self.cache.is_complete("retrain_bank", bkey):
            log.info("retrain: reusing view bank %s", path)
            rows = np.load(path / "rows.npy")
            clean = torch.from_numpy(np.load(path / "clean.npy"))
            weak = torch.from_numpy(np.load(path / "weak.npy"))
            strong = torch.from_numpy(np.load(path / "strong.npy")) if S else None
            self.bank = ViewBank(rows, clean, weak, strong)
            self.bank_seconds = 0.0
            return
        net = self.new_net().eval()
        log.info("retrain: view bank, %d train rows x (1 + %d + %d views) and %d test rows through the frozen "
                 "prefix (%d of %d blocks)", len(train_rows), V, S, len(test_rows), self.frozen_blocks,
                 net.parts.n_blocks if net.parts else 0)

        def prefix(net, batch):
            idx, x = batch
            B, K = x.shape[:2]
            h = net.prefix(x.flatten(0, 1).to(memory_format=torch.channels_last)).half()
            return {"idx": idx, "out": h.reshape(B, K, *h.shape[1:])}

        bs = max(1, int(self.rcfg.get("eval_batch_size", 256)) // (1 + V + S))
        tr = predict_arrays(net, BankItems(self.images, train_rows, np.full(len(train_rows), V),
                                           np.full(len(train_rows), S), self.transforms, self.seed),
                            prefix, self.root / "tmp_bank_train", self.tcfg, batch_size=bs)["out"]
        te = predict_arrays(net, BankItems(self.images, test_rows, np.zeros(len(test_rows), int),
                                           np.zeros(len(test_rows), int), self.transforms, self.seed),
                            prefix, self.root / "tmp_bank_test", self.tcfg,
                            batch_size=int(self.rcfg.get("eval_batch_size", 256)))["out"] \
            if len(test_rows) else torch.zeros((0, 1) + tuple(tr.shape[2:]), dtype=torch.float16)
        rows = np.concatenate([train_rows, test_rows]).astype(np.int64)
        clean = torch.cat([tr[:, 0], te[:, 0]])
        weak, strong = tr[:, 1:1 + V].contiguous(), tr[:, 1 + V:].contiguous() if S else None
        self.bank = ViewBank(rows, clean, weak, strong)
        self.bank_seconds = time.perf_counter() - t0
        if _rank() == 0:
            with self.cache.writing("retrain_bank", bkey) as tmp:
                atomic_save_npy(tmp / "rows.npy", rows)
                atomic_save_npy(tmp / "clean.npy", clean.numpy())
                atomic_save_npy(tmp / "weak.npy", weak.numpy())
                if S:
                    atomic_save_npy(tmp / "strong.npy", strong.numpy())

    def clean_items(self, rows: np.ndarray):
        """Dataset of ``(index, input)`` for the clean view of ``rows`` (bank tensors or images)."""
        bank, images, tf = self.bank, self.images, self.transforms["clean"]

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return len(rows)

            def __getitem__(self, i):
                r = int(rows[i])
                return i, (bank.clean[bank.pos[r]] if bank is not None else tf(images.get(r)))
        return Items()

    def predict(self, net, rows: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (n, D) float32 L2-normalised, logits (n, C)) of ``rows`` through ``net``."""
        from ssl_pipeline.stages.predict_writer import predict_arrays

        if len(rows) == 0:
            return np.zeros((0, self.backbone.embed_dim), np.float32), np.zeros((0, self.n_classes), np.float32)
        cached = self.bank is not None

        def fn(net, batch):
            idx, x = batch
            if not cached:
                x = x.to(memory_format=torch.channels_last)
            e = net.embed(x, cached=cached)
            return {"idx": idx, "emb": e.float(), "logits": net.head(e).float()}

        out = predict_arrays(net.eval(), self.clean_items(rows), fn, self.root / f"tmp_{name}", self.tcfg,
                             batch_size=int(self.rcfg.get("eval_batch_size", 256)))
        return out["emb"].numpy(), out["logits"].numpy()

    def view_probs(self, net, rows: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """(n, C) class probabilities of ``rows`` averaged over the clean view and the bank's weak views."""
        from ssl_pipeline.stages.predict_writer import predict_arrays

        _, lg = self.predict(net, rows, "eval")
        P = torch.softmax(torch.from_numpy(lg) / temperature, -1)
        bank = self.bank
        if bank is None or bank.weak is None or len(rows) == 0:
            return P.numpy()
        V = bank.n_views
        pos = np.array([bank.pos[int(r)] for r in rows])

        class Views(torch.utils.data.Dataset):
            def __len__(self):
                return len(pos) * V

            def __getitem__(self, i):
                return i, bank.weak[pos[i // V], i % V]

        def fn(net, batch):
            idx, x = batch
            return {"idx": idx, "logits": net(x, cached=True).float()}

        lgv = predict_arrays(net.eval(), Views(), fn, self.root / "tmp_views", self.tcfg,
                             batch_size=int(self.rcfg.get("eval_batch_size", 256)))["logits"]
        Pv = torch.softmax(lgv.reshape(len(rows), V, -1) / temperature, -1)
        return ((P + Pv.sum(1)) / (V + 1)).numpy()

    def init_head(self, net, ts) -> None:
        from ssl_pipeline.models.finetune import init_head_from_prototypes

        if self.contrastive and self.class_text is not None:  # samtone: the class table starts at the prompts
            with torch.no_grad():
                net.head[-1].weight.copy_(self.class_text)
            self.class_table = "text"
            return
        if self.rcfg.get("head_init", "prototypes") != "prototypes":
            self.class_table = "random"
            return
        self.class_table = "prototypes"
        lab = ~ts.is_pseudo
        if not lab.any():
            return
        emb, _ = self.predict(net, ts.rows[lab], "init")
        init_head_from_prototypes(net, torch.from_numpy(emb), torch.from_numpy(ts.labels[lab]))

    # -- one phase -------------------------------------------------------------------------------
    def fit(self, phase: str, ts, init_from=None):
        """Train (or resume, or load a finished) phase; return the trained net (EMA weights if on)."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        from ssl_pipeline.models.finetune import TrainItems
        from ssl_pipeline.models.module import FinetuneModule

        net = self.new_net(init_from)
        done = self.plan.finished(phase)
        pdir = self.root / phase
        self._logger = None
        if done is not None:
            log.info("retrain: %s already finished in %s; loading it", phase, done)
            net.load_state_dict(torch.load(done / "model.pt", map_location="cpu", weights_only=True))
            if done != pdir and _rank() == 0:
                pdir.mkdir(parents=True, exist_ok=True)
                for f in ("model.pt", "done.json"):
                    shutil.copy(done / f, pdir / f)
            return net
        if init_from is None:
            self.init_head(net, ts)
        ckpt = self.plan.checkpoint(phase)
        items = TrainItems(ts, self.bank, None if self.bank is not None else self.images, self.transforms)
        val_every = int(self.rcfg.get("val_every", 0) or 0)
        val_loader = None
        if val_every > 0 and len(self.test_rows):
            test_y = torch.from_numpy(self.test_y)

            def collate(b):
                return torch.stack([x for _, x in b]), test_y[[i for i, _ in b]]
            val_loader = torch.utils.data.DataLoader(self.clean_items(self.test_rows), collate_fn=collate,
                                                     batch_size=int(self.rcfg.get("eval_batch_size", 256)))
        module = FinetuneModule(net, items, ts, self.opt(), loss=self.loss,
                                unsup=self.unsup["loss"] if self.unsup else None, seed=self.seed, phase=phase,
                                cached=self.bank is not None, val_loader=val_loader)
        steps = int(self.rcfg.steps)
        every = max(1, int(self.rcfg.get("checkpoint_every", 50) or steps))
        ckpt_cb = ModelCheckpoint(dirpath=str(pdir / "checkpoints"), save_last=True, save_top_k=0,
                                  every_n_train_steps=every, save_on_train_epoch_end=False)
        logger = make_logger(self.rcfg, self.run_dir / "retrain_logs", phase)
        trainer = make_trainer(self.tcfg, max_steps=steps, max_epochs=-1, logger=logger,
                               callbacks=[ckpt_cb, *self.extra_callbacks], enable_checkpointing=True,
                               log_every_n_steps=int(self.rcfg.get("log_every", 10)),
                               val_check_interval=val_every if val_loader is not None else None,
                               check_val_every_n_epoch=None if val_loader is not None else 1,
                               limit_val_batches=1.0 if val_loader is not None else 0, num_sanity_val_steps=0)
        if ckpt is not None:
            log.info("retrain: %s resumes from %s", phase, ckpt)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen tower, on purpose
            trainer.fit(module, ckpt_path=str(ckpt) if ckpt is not None else None)
        self.fit_seconds[phase] = round(time.perf_counter() - t0, 2)
        self.world_size = trainer.world_size
        module.apply_ema()
        self._logger = logger
        net = module.net.cpu()
        if _rank() == 0:
            pdir.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), pdir / "model.pt")
            write_json(pdir / "done.json", {"key": self.key, "steps": steps, "seconds": self.fit_seconds[phase]})
        return net

    def log_final(self, phase: str, acc: float) -> None:
        lg = getattr(self, "_logger", None)
        if lg and _rank() == 0:
            lg.log_metrics({"val/acc": acc}, step=int(self.rcfg.steps))
            lg.save()

    def relabel(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, confidence, noise) of a fresh ``cfg.pseudolabel.labeler`` fitted on ``X`` with labels ``y``."""
        from ssl_pipeline.labeling.knn import knn_graph

        labeler = instantiate(self.cfg.pseudolabel.labeler)
        labeler.fit(X, y, neighbors=knn_graph(X, int(self.cfg.cluster.k)))
        return (np.asarray(labeler.labels_, np.int64), np.asarray(labeler.confidence_, np.float32),
                np.asarray(getattr(labeler, "noise_", np.zeros(len(X), bool)), bool))

    # -- the whole stage ---------------------------------------------------------------------
    def run(self, pl_dir: Path) -> tuple[dict, dict]:
        from ssl_pipeline.models.finetune import TrainSet

        rc = self.rcfg
        t0 = time.perf_counter()
        self.fit_seconds: dict[str, float] = {}
        self.world_size = 1
        graph_rows = np.load(pl_dir / "rows.npy")
        labeled = np.load(pl_dir / "labeled.npy")
        y_true = np.asarray(self.table.y_true)
        test_pos = test_positions(self.table, self.store)
        self.test_rows = self.store.rows[test_pos].astype(np.int64)
        self.test_y = y_true[self.test_rows]
        g_labels = np.load(pl_dir / "labels.npy")
        g_conf = np.load(pl_dir / "confidence.npy").astype(np.float32)
        g_noise = np.load(pl_dir / "noise.npy")
        g_true = y_true[graph_rows]
        unl_rows = graph_rows[~labeled] if (self.consistency or self.unsup) else np.zeros(0, np.int64)
        rows, labels, w, is_pseudo = select_training(graph_rows, g_labels, g_conf, labeled, g_noise, rc)
        metrics = {"retrain/mode": "finetune", "retrain/n_train": len(rows), "retrain/n_pseudo": int(is_pseudo.sum()),
                   "retrain/pseudo_weight_mean": float(w[is_pseudo].mean()) if is_pseudo.any() else 0.0,
                   "retrain/trainable_params": self.trainable_params, "retrain/total_params": self.total_params,
                   "retrain/steps": int(rc.steps)}
        if self.cached:
            self.build_bank(graph_rows.astype(np.int64), self.test_rows)
            metrics["retrain/bank_seconds"] = round(self.bank_seconds, 2)
            metrics["retrain/cache_views"] = self.bank.n_views

        def acc(logits):
            return float((logits.argmax(1) == self.test_y).mean()) if len(self.test_y) else float("nan")

        lab = ~is_pseudo
        lab_ts = TrainSet(rows[lab], labels[lab], np.ones(int(lab.sum()), np.float32), np.zeros(int(lab.sum()), bool),
                          np.zeros(0, np.int64))
        lab_net = self.fit("labeled_only", lab_ts)
        filt = str(rc.get("pseudo_filter", "none"))
        if filt not in ("none", "agree"):
            raise ConfigError("retrain.pseudo_filter", f"must be none or agree, got {filt!r}")
        needs_teacher = filt != "none" or float(rc.get("pseudo_top", 1.0)) < 1 or rc.get("pseudo_targets") == "soft"
        eval_rows = np.concatenate([graph_rows, self.test_rows]) if needs_teacher else self.test_rows
        _, lg = self.predict(lab_net, eval_rows, "eval")
        teacher = lg[:len(graph_rows)] if needs_teacher else None  # labeled-only logits on the training rows
        lab_acc = acc(lg[len(eval_rows) - len(self.test_rows):])
        self.log_final("labeled_only", lab_acc)
        states = {"model_labeled_only.pt": lab_net.state_dict()}
        extra_arrays = {}
        n_rounds = int(rc.get("rounds", 1))
        if n_rounds < 1:
            raise ConfigError("retrain.rounds", f"must be >= 1, got {n_rounds}")
        prev, Xg = None, None
        y_graph = np.where(labeled, g_true, -1)
        known = ~labeled & (g_true >= 0)
        soft = str(rc.get("pseudo_targets", "hard")) == "soft"
        if str(rc.get("pseudo_targets", "hard")) not in ("hard", "soft"):
            raise ConfigError("retrain.pseudo_targets", f"must be hard or soft, got {rc.pseudo_targets!r}")
        teacher_net, teacher_probs = lab_net, None
        relabel_first = bool(rc.get("relabel_first", False))
        if relabel_first:  # round 1 re-labels too: on the training rows encoded by the labeled-only model
            Xg, _ = self.predict(lab_net, graph_rows, "encode")
        for r in range(1, n_rounds + 1):
            if r > 1 or relabel_first:  # re-label with a fresh labeler on the re-encoded rows, same given labels
                g_labels, g_conf, g_noise = self.relabel(Xg, y_graph)
                if known.any():
                    metrics[f"retrain/round{r}/pseudolabel_accuracy"] = float((g_labels[known] == g_true[known]).mean())
                extra_arrays[f"round{r}_pseudolabels.npz"] = dict(rows=graph_rows, labels=g_labels, confidence=g_conf,
                                                                   noise=g_noise)
            use = filter_pseudo(g_labels, g_conf, labeled, teacher, filt, float(rc.get("pseudo_top", 1.0)))
            rows, labels, w, is_pseudo = select_training(graph_rows, use, g_conf, labeled, g_noise, rc)
            targets = None
            if soft:  # the labeler's label, as a distribution, times the previous model's view-averaged posterior
                if teacher_probs is None:
                    teacher_probs = self.view_probs(teacher_net, graph_rows, float(rc.get("teacher_temperature", 1.0)))
                gpos = {int(x): i for i, x in enumerate(graph_rows)}
                targets = soft_targets(use, g_conf, labeled, teacher_probs)[[gpos[int(x)] for x in rows]]
            metrics[f"retrain/round{r}/n_pseudo"] = int(is_pseudo.sum())
            kept = known & np.isin(graph_rows, rows)
            if kept.any():
                metrics[f"retrain/round{r}/used_pseudolabel_accuracy"] = float((use[kept] == g_true[kept]).mean())
            ts = TrainSet(rows, labels, w, is_pseudo, unl_rows, targets)
            init = prev if (r > 1 and rc.get("round_init", "pretrained") == "previous") else None
            net = self.fit(f"round{r}", ts, init_from=init)
            last = r == n_rounds
            eval_rows = self.test_rows if last else np.concatenate([graph_rows, self.test_rows])
            emb, lg = self.predict(net, eval_rows, "eval")
            metrics[f"retrain/round{r}/test_accuracy"] = acc(lg[len(eval_rows) - len(self.test_rows):])
            self.log_final(f"round{r}", metrics[f"retrain/round{r}/test_accuracy"])
            if not last:
                Xg, teacher = emb[:len(graph_rows)], lg[:len(graph_rows)]
                teacher_net, teacher_probs = net, None
            prev = net
        final = metrics[f"retrain/round{n_rounds}/test_accuracy"]
        if len(self.test_rows):
            metrics["retrain/test_accuracy"] = final
            metrics["retrain/labeled_only_test_accuracy"] = lab_acc
            metrics["retrain/n_test"] = len(self.test_rows)
        else:
            for k in [k for k in metrics if k.endswith("/test_accuracy")]:
                del metrics[k]
        metrics["retrain/world_size"] = int(self.world_size)
        if self.contrastive:
            metrics["retrain/class_table"] = getattr(self, "class_table", "prototypes")
        if self.unsup:
            metrics["retrain/unlabeled_objective"] = "simcse_pp"
            metrics["retrain/n_unlabeled"] = len(unl_rows)
        metrics["retrain/train_seconds"] = round(sum(self.fit_seconds.values()), 2)
        states["model.pt"] = prev.state_dict()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has read its last predictions
        if _rank() == 0:
            for d in self.root.glob("tmp_*"):
                shutil.rmtree(d, ignore_errors=True)
        log.info("retrain: finetune done in %.0fs: test acc %.4f vs labeled-only %.4f", time.perf_counter() - t0,
                 final, lab_acc)
        return metrics, {"states": states, "arrays": extra_arrays}

