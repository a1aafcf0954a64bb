"""Fine-tuning a descriptor for retrieval, following Radenovic, Tolias & Chum (TPAMI 2018).

One epoch = re-mine hard negatives with the current network (:mod:`cbir.train.mining`),
then train on ``max_tuples`` tuples (query, positive, K negatives) with the contrastive
or triplet loss, a tuple per forward pass by default and gradients accumulated over a
batch of tuples; then score the held-out classes (mAP, :func:`cbir.eval.evaluate_labelled`)
and write a checkpoint from which ``resume`` continues exactly.

The choices that come from the paper: GeM pooling with a learned p (initialised at 3) that
gets a 10x learning rate and no weight decay; Adam with an exponential learning-rate decay
of exp(-0.01) per epoch; weight decay 1e-6; BatchNorm statistics frozen (a batch of one
tuple gives useless statistics). The learning rate default (1e-6) is theirs too; short CPU
runs need a larger one (see ``bench/finetune.py``).

The result is an ordinary descriptor file (:meth:`cbir.models.Descriptor.save`), so every
command that takes ``--model`` uses it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cbir.allocator import tune_allocator
from cbir.defaults import RADENOVIC_LR_DECAY as RADENOVIC_LR_DECAY  # written once, in cbir.defaults
from cbir.eval.gpr1200 import evaluate_labelled
from cbir.fileio import atomic_torch_save
from cbir.models.backbones import DEFAULT_BACKBONE
from cbir.models.descriptor import Descriptor, build_descriptor
from cbir.models.pooling import RMAC, build_pooling, parse_pooling
from cbir.models.whitening import Whitening, fit_learned_whitening, fit_pca_whitening, pairs_from_labels
from cbir.runtime.device import DEVICES, describe_device, resolve_device
from cbir.train.augment import augment_array
from cbir.train.data import ImageCache, TrainData, TrainDataError, split_by_class, with_holdout
from cbir.train.distillation import Distiller
from cbir.train.interpolation import AUTO_ALPHAS, choose_alpha, interpolate_state, parse_interpolate
from cbir.train.losses import DEFAULT_MARGINS, LOSSES, distillation_loss, tuple_loss, unpack_tuples
from cbir.train.mining import SAMPLINGS, EpochTuples, mine_epoch

CHECKPOINT_FORMAT = "cbir-train-checkpoint"
CHECKPOINT_VERSION = 1
#: Training images whose regions initialise R-MAC's region whitening (PCA; Gordo et al. 2017).
REGION_WHITENING_IMAGES = 200


@dataclass
class TrainConfig:
    """Every setting that changes the trained weights (saved in checkpoints and the model)."""

    model: str = DEFAULT_BACKBONE
    pooling: str = "gem"
    loss: str = "contrastive"
    margin: float | None = None  # None: 0.7 contrastive (Radenovic), 0.1 triplet (Gordo)
    epochs: int = 10
    max_tuples: int = 1000
    negatives: int = 5
    pool_size: int = 2000
    image_size: int | None = None  # training input size (max side for 'keep'); None: the model's
    batch_size: int = 5  # tuples per optimizer step (gradients accumulated)
    chunk: int = 1  # tuples per forward pass (memory knob; does not change the result much)
    lr: float = 1e-6
    p_lr_mult: float = 10.0
    weight_decay: float = 1e-6
    lr_decay: float = RADENOVIC_LR_DECAY
    freeze_bn: bool = True
    freeze: float = 0.0  # share of backbone weights, from the input side, kept fixed
    val_fraction: float = 0.1
    stratify: bool = True  # hold out classes of every domain; validation = mean over domains
    sampling: str = "image"  # queries uniform over images ('image') or over classes ('class')
    augment: bool = False  # random crop + flip of each training image (not mining/validation)
    seed: int = 0
    whiten: bool = False
    whiten_dim: int | None = None
    keep: str = "best"  # 'best' (highest validation mAP) or 'last'
    time_limit: float | None = None  # seconds; stop before an epoch that would overrun
    patience: int | None = None  # stop after this many epochs without a better validation mAP
    #: WiSE-FT weight of the fine-tuned network (0 = off the shelf, 1 = fine-tuned), 'auto' =
    #: chosen on validation, None = no interpolation
    interpolate: float | str | None = None
    #: weight of feature distillation towards the starting network (cbir.train.distillation); 0 = none
    distill: float = 0.0
    device: str = "auto"  # where training runs: auto (a GPU torch sees, else the CPU), cpu, cuda
    recipe: str | None = None  # the recipe the unset settings came from (cbir.train.recipes), for the record

    def __post_init__(self) -> None:
        self.interpolate = parse_interpolate(self.interpolate)
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}: choose from {list(SAMPLINGS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose from {list(LOSSES)}")
        for name in ("epochs", "max_tuples", "negatives", "pool_size", "batch_size", "chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise ValueError("learning rate must be positive")
        if self.keep not in ("best", "last"):
            raise ValueError("keep must be 'best' or 'last'")
        if not 0.0 <= self.freeze < 1.0:
            raise ValueError("freeze must be a fraction in [0, 1)")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError("image size must be at least 16")
        if self.distill < 0:
            raise ValueError("the distillation weight must be at least 0")
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience must be at least 1 epoch")

    @property
    def effective_margin(self) -> float:
        return DEFAULT_MARGINS[self.loss] if self.margin is None else float(self.margin)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A saved configuration; a setting added after it was saved takes the value that
        reproduces what that run did (:data:`LEGACY_DEFAULTS`), so it resumes exactly."""
        known = {f.name for f in fields(cls)}
        values = {**LEGACY_DEFAULTS, **d}
        return cls(**{k: v for k, v in values.items() if k in known})


#: Settings whose default changed when they were introduced, with the behaviour of runs
#: saved before: those split validation classes from all domains at once.
LEGACY_DEFAULTS: dict[str, Any] = {"stratify": False}


@dataclass
class EpochStats:
    epoch: int
    loss: float | None
    val_map: float | None
    lr: float | None
    p: float | None
    seconds: float
    mining_seconds: float = 0.0
    negative_similarity: float | None = None
    val_domains: dict[str, float] | None = None  # validation mAP of each domain

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    descriptor: Descriptor
    history: list[EpochStats]
    best_epoch: int
    seconds: float
    whitening_val_map: float | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # where it trained, with the GPU's name: describe_device()


# ----------------------------------------------------------------------------------------
# model and optimizer
# ----------------------------------------------------------------------------------------
def build_training_descriptor(config: TrainConfig) -> Descriptor:
    """The descriptor to fine-tune: the backbone (name or descriptor file) with a learnable
    GeM (p from the file if it already has one, else 3), single scale, no whitening."""
    try:
        desc = build_descriptor(config.model)
    except (RuntimeError, OSError) as exc:
        raise ValueError(str(exc)) from exc
    spec = parse_pooling(config.pooling)
    if spec["name"] in ("gem", "rgem"):
        old = desc.pooling.spec()
        if "p" not in spec and old.get("name") == spec["name"] and os.path.isfile(config.model):
            spec["p"] = float(old["p"])
        spec["learnable"] = True
    old_rmac = desc.pooling if isinstance(desc.pooling, RMAC) else None
    if not (
        spec["name"] == "rmac"
        and old_rmac is not None
        and old_rmac.region_whitening is not None
        and spec.get("levels", old_rmac.levels) == old_rmac.levels
    ):  # a descriptor file's trained R-MAC (region whitening included) is fine-tuned further as it is
        desc.pooling = build_pooling(spec)
    desc.whitening = None
    desc.meta = {**desc.meta, "inference_scales": list(desc.scales)}
    desc.scales = (1.0,)
    return desc


def freeze_leading(desc: Descriptor, fraction: float) -> int:
    """Fix the first ``fraction`` of the backbone's weights (counted in numbers, in
    definition order, i.e. from the input side); returns how many tensors were frozen.

    Early layers hold generic filters and most of the compute at high resolution; not
    training them makes a CPU epoch several times cheaper, because backpropagation
    stops at the first trainable layer.
    """
    if fraction <= 0:
        return 0
    params = list(desc.backbone.parameters())
    total = sum(p.numel() for p in params)
    done, frozen = 0, 0
    for p in params:
        if done + p.numel() > fraction * total:
            break
        p.requires_grad_(False)
        done += p.numel()
        frozen += 1
    return frozen


def parameter_groups(desc: Descriptor, config: TrainConfig) -> list[dict[str, Any]]:
    """Backbone weights at ``lr`` with weight decay; pooling parameters (GeM's p) at
    ``p_lr_mult * lr`` without weight decay (Radenovic et al. 2018); R-MAC's region
    whitening (shift + projection, Gordo et al. 2017) at ``lr`` without weight decay (the
    regions are L2-normalised after it, so its scale is free and decay would only shrink it)."""
    rw = getattr(desc.pooling, "region_whitening", None)
    rw_params = [p for p in rw.parameters() if p.requires_grad] if rw is not None else []
    rw_ids = {id(p) for p in rw_params}
    pool_params = [p for p in desc.pooling.parameters() if p.requires_grad and id(p) not in rw_ids]
    backbone = [p for p in desc.backbone.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {
            "params": backbone,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "name": "backbone",
        }
    ]
    if pool_params:
        groups.append(
            {
                "params": pool_params,
                "lr": config.lr * config.p_lr_mult,
                "weight_decay": 0.0,
                "name": "pooling",
            }
        )
    if rw_params:
        groups.append({"params": rw_params, "lr": config.lr, "weight_decay": 0.0, "name": "region_whitening"})
    return groups


def build_optimizer(
    desc: Descriptor, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam over :func:`parameter_groups` and an exponential decay stepped once per epoch."""
    opt = torch.optim.Adam(parameter_groups(desc, config))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay)
    return opt, sched


def set_train_mode(desc: Descriptor, freeze_bn: bool) -> None:
    """Training mode, with BatchNorm layers kept in eval mode (running statistics frozen)
    when ``freeze_bn``: their affine weights still learn."""
    desc.train()
    if freeze_bn:
        for m in desc.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ----------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------
class Trainer:
    """Holds the model, data, optimizer and history of one fine-tuning run."""

    def __init__(
        self,
        config: TrainConfig,
        train: TrainData,
        val: TrainData | None = None,
        *,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        cache: ImageCache | None = None,
    ) -> None:
        self.config = config
        self.train_data = train
        self.val_data = val
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.cache = cache or ImageCache()
        tune_allocator()  # activations of every step would otherwise be page-faulted in anew
        torch.manual_seed(config.seed)
        self.device = torch.device(resolve_device(config.device, "torch"))
        self.device_name = describe_device(str(self.device))  # for the log, the summary, the meta
        self.desc = build_training_descriptor(config)
        freeze_leading(self.desc, config.freeze)
        self.infer_pre = self.desc.preprocess
        self.train_pre = self.infer_pre.override(size=config.image_size) if config.image_size else self.infer_pre
        self.desc.to(self.device)
        if isinstance(self.desc.pooling, RMAC):
            if self.desc.pooling.region_whitening is None:
                self.desc.pooling.set_region_whitening(self.fit_region_whitening())
            self.desc.pooling.region_whitening.set_learnable(True)
            self.desc.to(self.device)
        #: the network before fine-tuning: one end of --interpolate's line
        self.initial_state = {k: v.detach().clone() for k, v in self.desc.state_dict().items()}
        self.distiller = Distiller(self.desc, config.distill) if config.distill > 0 else None
        self.optimizer, self.scheduler = build_optimizer(self.desc, config)
        self.loss_fn = tuple_loss(config.loss, config.margin)
        self.epoch = 0
        self.history: list[EpochStats] = []
        self.best: dict[str, Any] | None = None
        self.last_val_domains: dict[str, float] | None = None

    # -- describing ------------------------------------------------------------------------
    def embed(self, data: TrainData, indices: np.ndarray, preprocess, desc_text: str = "describing") -> np.ndarray:
        """L2-normalised descriptors of ``data.files[indices]`` with the current weights."""
        self.desc.eval()
        indices = np.asarray(indices, dtype=np.int64)
        out = np.zeros((len(indices), self.desc.dim), dtype=np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        bar = _bar(len(indices), desc_text, "img", self.progress)
        arrays = {}
        for j, i in enumerate(indices):
            arr = self.cache.get(data.files[i], preprocess)
            arrays[j] = arr
            by_shape.setdefault(arr.shape, []).append(j)
        with torch.inference_mode():
            for rows in by_shape.values():
                for s in range(0, len(rows), 32):
                    part = rows[s : s + 32]
                    x = torch.from_numpy(np.stack([arrays[j] for j in part])).to(self.device)
                    out[part] = self.desc(preprocess.normalize(x)).float().cpu().numpy()
                    bar.update(len(part))
        bar.close()
        return out

    def validate(self) -> float | None:
        """mAP of the held-out images queried against each other (leave-one-out).

        With ``stratify`` and several domains, each domain's images are scored among
        themselves and the score is the mean over domains (as GPR1200 weighs its domains
        equally): in one pooled ranking, a small domain whose classes are easy to tell
        from the other domain's would barely move the score, and model selection would be
        blind to it. The per-domain scores are kept in :attr:`last_val_domains`.
        """
        self.last_val_domains = None
        if self.val_data is None:
            return None
        data = self.val_data
        feats = self.embed(data, np.arange(len(data)), self.infer_pre, "validating")
        domains = data.domains()
        if not self.config.stratify or len(domains) == 1:
            return evaluate_labelled(feats, data.labels).mAP
        scores = {}
        for name, labs in domains.items():
            rows = np.flatnonzero(np.isin(data.labels, labs))
            scores[name] = evaluate_labelled(feats[rows], data.labels[rows]).mAP
        self.last_val_domains = scores
        return float(np.mean(list(scores.values())))

    # -- one epoch ---------------------------------------------------------------------------
    def epoch_rng(self, epoch: int) -> np.random.Generator:
        """Independent, reproducible randomness per epoch (resume needs no stream position)."""
        return np.random.default_rng([self.config.seed, epoch])

    def mine(self, epoch: int) -> EpochTuples:
        c = self.config
        return mine_epoch(
            self.train_data,
            lambda idx: self.embed(self.train_data, idx, self.train_pre, f"mining {epoch}"),
            n_tuples=c.max_tuples,
            n_negatives=c.negatives,
            pool_size=c.pool_size,
            rng=self.epoch_rng(epoch),
            sampling=c.sampling,
        )

    def tuple_forward(self, tuples: EpochTuples, rows: np.ndarray) -> torch.Tensor:
        """Loss (mean over ``rows``) for the given tuples, with gradients."""
        imgs = tuples.images(rows)
        arrays = [self.cache.get(self.train_data.files[i], self.train_pre) for i in imgs]
        if self.config.augment:
            arrays = [augment_array(a) for a in arrays]
        dev = self.device
        if len({a.shape for a in arrays}) == 1:
            batches = [(imgs, self.train_pre.normalize(torch.from_numpy(np.stack(arrays)).to(dev)))]
        else:  # 'keep' preprocessing: images of different shapes go one by one
            batches = [
                ([i], self.train_pre.normalize(torch.from_numpy(a[None]).to(dev)))
                for i, a in zip(imgs, arrays, strict=True)
            ]
        vecs = torch.cat([self.desc(x) for _, x in batches])
        found = [int((tuples.negatives[r] >= 0).sum()) for r in rows]
        loss = self.loss_fn(*unpack_tuples(vecs, found, tuples.negatives.shape[1]))
        if self.distiller is not None:  # an augmented crop is new each step: its target is too
            fixed = not self.config.augment
            targets = torch.cat([self.distiller.targets(ids, x, cacheable=fixed) for ids, x in batches])
            loss = loss + self.distiller.weight * distillation_loss(vecs, targets)
        return loss

    def train_epoch(self, tuples: EpochTuples, epoch: int) -> float:
        """One pass over ``tuples``: an optimizer step every ``batch_size`` tuples."""
        c = self.config
        set_train_mode(self.desc, c.freeze_bn)
        n = len(tuples)
        total, count = 0.0, 0
        bar = _bar(n, f"epoch {epoch}/{c.epochs}", "tuple", self.progress)
        for b0 in range(0, n, c.batch_size):
            batch = np.arange(b0, min(n, b0 + c.batch_size))
            self.optimizer.zero_grad(set_to_none=True)
            for s in range(0, len(batch), c.chunk):
                rows = batch[s : s + c.chunk]
                loss = self.tuple_forward(tuples, rows)
                (loss * (len(rows) / len(batch))).backward()
                total += float(loss.detach()) * len(rows)
                count += len(rows)
                bar.update(len(rows))
            self.optimizer.step()
            bar.set_postfix(loss=f"{total / count:.4f}", p=f"{self.p_value() or 0:.3f}")
        bar.close()
        self.scheduler.step()
        return total / max(count, 1)

    def p_value(self) -> float | None:
        p = getattr(self.desc.pooling, "p", None)
        return float(p.detach()) if isinstance(p, torch.Tensor) else None

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "pooling": self.desc.pooling.spec(),
            "model": self.desc.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _np_state(),
                "python": list(_py_state()),
            },
            "history": [h.to_dict() for h in self.history],
            "best": self.best,
            "data": {"source": self.train_data.source, "images": len(self.train_data)},
        }

    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        state = self.checkpoint_state()
        path = folder / f"epoch-{self.epoch:03d}.pt"
        atomic_torch_save(state, path)
        atomic_torch_save(state, folder / "last.pt")
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, RNG states, epoch and history."""
        state = load_checkpoint_file(path)
        self.desc.pooling = build_pooling(state["pooling"])
        self.desc.load_state_dict(state["model"])
        if isinstance(self.desc.pooling, RMAC) and self.desc.pooling.region_whitening is not None:
            self.desc.pooling.region_whitening.set_learnable(True)
        self.desc.to(self.device)
        self.optimizer, self.scheduler = build_optimizer(self.desc, self.config)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(_np_state_from(state["rng"]["numpy"]))
        random.setstate(_py_state_from(state["rng"]["python"]))
        self.epoch = int(state["epoch"])
        self.history = [EpochStats(**h) for h in state["history"]]
        self.best = state["best"]

    # -- the whole run ---------------------------------------------------------------------------
    def fit(self, checkpoint_dir: str | os.PathLike | None = None) -> TrainResult:
        c = self.config
        start = time.perf_counter()
        spent_before = sum(h.seconds for h in self.history)
        self.log(f"training on {self.device_name}")
        if self.epoch == 0 and not self.history:
            t0 = time.perf_counter()
            val = self.validate()
            stats = EpochStats(0, None, val, None, self.p_value(), time.perf_counter() - t0,
                               val_domains=self.last_val_domains)  # fmt: skip
            self.history.append(stats)
            self._update_best(val)
            if val is not None:
                self.log(f"epoch 0 (off the shelf): validation mAP {val:.4f}{self._domains_text()}")
                if val >= 1.0 and c.keep == "best":
                    self.log(
                        "warning: validation is already perfect off the shelf (e.g. held-out clusters of "
                        "near-duplicates), so it cannot choose an epoch and 'best' keeps epoch 0: give "
                        "--holdout DIR (other data), --val DIR or --keep last"
                    )
        stopped = False
        while self.epoch < c.epochs:
            epoch = self.epoch + 1
            if self._out_of_patience():
                self.log(
                    f"stopping before epoch {epoch}: validation mAP has not improved for "
                    f"{self.epoch - int(self.best['epoch'])} epochs (best: epoch "
                    f"{self.best['epoch']}, {self.best['val_map']:.4f}; patience {c.patience})"
                )
                stopped = True
                break
            if c.time_limit is not None and len(self.history) > 1:
                spent = spent_before + time.perf_counter() - start
                last = self.history[-1].seconds
                if spent + last > c.time_limit:
                    self.log(
                        f"stopping before epoch {epoch}: {spent:.0f}s spent, an epoch takes "
                        f"~{last:.0f}s, limit {c.time_limit:.0f}s"
                    )
                    stopped = True
                    break
            t0 = time.perf_counter()
            torch.manual_seed(c.seed * 100_003 + epoch)
            tuples = self.mine(epoch)
            t_mine = time.perf_counter() - t0
            lr = float(self.optimizer.param_groups[0]["lr"])
            loss = self.train_epoch(tuples, epoch)
            val = self.validate()
            self.epoch = epoch
            stats = EpochStats(
                epoch,
                loss,
                val,
                lr,
                self.p_value(),
                time.perf_counter() - t0,
                t_mine,
                tuples.mean_negative_similarity,
                self.last_val_domains,
            )
            self.history.append(stats)
            self._update_best(val)
            val_text = f", validation mAP {val:.4f}{self._domains_text()}" if val is not None else ""
            self.log(
                f"epoch {epoch}/{c.epochs}: loss {loss:.4f}{val_text}, p {stats.p or 0:.3f}, "
                f"hard-negative similarity {tuples.mean_negative_similarity:.3f}, "
                f"{stats.seconds:.0f}s"
            )
            if checkpoint_dir is not None:
                self.save_checkpoint(checkpoint_dir)
        return self._finish(spent_before + time.perf_counter() - start, stopped)

    def _domains_text(self) -> str:
        d = self.last_val_domains
        return " (" + ", ".join(f"{k} {v:.4f}" for k, v in d.items()) + ")" if d else ""

    def _out_of_patience(self) -> bool:
        """Early stopping: ``patience`` epochs since the best validation mAP (the kept
        epoch with ``keep='best'``), so further epochs are unlikely to change the output."""
        p = self.config.patience
        return p is not None and self.best is not None and self.epoch - int(self.best["epoch"]) >= p

    def _update_best(self, val: float | None) -> None:
        if val is None:
            return
        if self.best is None or val > self.best["val_map"]:
            self.best = {
                "epoch": self.epoch,
                "val_map": float(val),
                "pooling": self.desc.pooling.spec(),
                "model": {k: v.detach().clone() for k, v in self.desc.state_dict().items()},
            }

    def _finish(self, seconds: float, stopped: bool) -> TrainResult:
        c = self.config
        out = self.desc
        best_epoch = self.epoch
        if c.keep == "best" and self.best is not None and self.best["epoch"] != self.epoch:
            out.pooling = build_pooling(self.best["pooling"])
            out.load_state_dict(self.best["model"])
            best_epoch = int(self.best["epoch"])
            self.log(f"keeping epoch {best_epoch} (best validation mAP {self.best['val_map']:.4f})")
        alpha, alpha_scores = self.interpolate()
        out.scales = tuple(out.meta.pop("inference_scales", [1.0]))
        out.eval()
        w_val = None
        if c.whiten:
            out.whitening = self.fit_whitening().to(self.device)
            if self.val_data is not None:
                w_val = self.validate()
                self.log(f"validation mAP with learned whitening: {w_val:.4f}")
        out.meta = {
            **out.meta,
            "trained": {
                "config": c.to_dict(),
                "data": self.train_data.source,
                "images": len(self.train_data),
                "history": [h.to_dict() for h in self.history],
                "kept_epoch": best_epoch,
                "interpolation": None if alpha is None else {"alpha": alpha, "validation": alpha_scores},
                "seconds": round(seconds, 1),
                "device": self.device_name,
            },
        }
        out.to("cpu")
        extra = {} if alpha is None else {"alpha": alpha, "alpha_scores": alpha_scores}
        return TrainResult(out, list(self.history), best_epoch, seconds, w_val, stopped, extra, self.device_name)

    def interpolate(self) -> tuple[float | None, dict[str, float]]:
        """Apply ``config.interpolate`` (WiSE-FT) to the kept network: a given weight, or the
        candidate of :data:`AUTO_ALPHAS` with the best validation mAP. Returns the weight used
        and the validation mAP of each weight tried ({} for a given weight)."""
        mode = self.config.interpolate
        if mode is None:
            return None, {}
        tuned = {k: v.detach().clone() for k, v in self.desc.state_dict().items()}
        if mode == "auto":
            if self.val_data is None:
                raise TrainDataError("--interpolate auto needs validation data (--val, --val-fraction or --holdout)")

            def score(a: float) -> float | None:
                self.desc.load_state_dict(interpolate_state(self.initial_state, tuned, a))
                return self.validate()

            alpha, scores = choose_alpha(score, AUTO_ALPHAS)
            self.log(
                "interpolation (validation mAP by weight of the fine-tuned network): "
                + ", ".join(f"{a:g} {s:.4f}" for a, s in scores.items())
                + f"; using {alpha:g}"
            )
        else:
            alpha, scores = float(mode), {}
        self.desc.load_state_dict(interpolate_state(self.initial_state, tuned, alpha))
        return alpha, {f"{a:g}": round(s, 6) for a, s in scores.items()}

    def fit_region_whitening(self) -> Whitening:
        """R-MAC's region whitening initialised as Gordo et al. do: PCA of the L2-normalised
        region vectors of (up to :data:`REGION_WHITENING_IMAGES`) training images, then trained
        with the rest of the network as a shift + projection layer."""
        data = self.train_data
        rng = np.random.default_rng([self.config.seed, 7])
        pick = np.sort(rng.choice(len(data), size=min(REGION_WHITENING_IMAGES, len(data)), replace=False))
        pooling = self.desc.pooling
        self.desc.eval()
        chunks = []
        with torch.inference_mode():
            for i in pick:
                arr = self.cache.get(data.files[i], self.infer_pre)
                x = self.infer_pre.normalize(torch.from_numpy(np.array(arr[None])).to(self.device))
                chunks.append(pooling.regions(self.desc.backbone(x))[0].float().cpu().numpy())
        regions = np.concatenate(chunks)
        w = fit_pca_whitening(regions, source=data.source)
        w.meta.update({"kind": "pca-regions", "images": len(pick), "regions": int(len(regions)), "trained": True})
        self.log(f"region whitening initialised by PCA on {len(regions)} regions of {len(pick)} training images")
        return w.to(self.device)

    def fit_whitening(self) -> Whitening:
        """Radenovic et al.'s learned whitening, on the training images only."""
        data = self.train_data
        saved = self.desc.whitening
        self.desc.whitening = None
        try:
            feats = self.embed(data, np.arange(len(data)), self.infer_pre, "whitening")
        finally:
            self.desc.whitening = saved
        if data.pairs is not None:
            q, p = data.pairs[:, 0], data.pairs[:, 1]
        else:
            q, p = pairs_from_labels(data.labels, seed=self.config.seed)
        return fit_learned_whitening(feats, q, p, dim=self.config.whiten_dim, source=data.source)


# ----------------------------------------------------------------------------------------
# the one-call API
# ----------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    data: TrainData,
    *,
    val: TrainData | None = None,
    out: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    holdout: TrainData | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` on ``data`` and (if ``out``) write the descriptor file.

    Without ``val``, ``config.val_fraction`` of the classes are held out for validation
    (0 disables it). With ``resume``, the checkpoint's configuration is used, except the
    stopping rules (``epochs``, ``time_limit``, ``patience``), which do not change what an
    epoch computes: a finished run may be extended, a running one stopped early.

    ``holdout`` is data that is never trained on and is added to validation as domains of
    its own, so model selection (the kept epoch, ``interpolate="auto"``) sees what fine-tuning
    costs outside the training data's domains.
    """
    if resume is not None:
        saved = TrainConfig.from_dict(load_checkpoint_file(resume)["config"])
        saved.epochs, saved.time_limit = config.epochs, config.time_limit
        saved.patience, saved.device = config.patience, config.device
        config = saved
    if val is None and config.val_fraction > 0:
        data, val = split_by_class(data, config.val_fraction, config.seed, stratify=config.stratify)
    if holdout is not None:
        val = with_holdout(val, holdout)
    if val is not None and len(np.unique(val.labels)) < 2:
        raise TrainDataError("validation data needs at least two classes")
    trainer = Trainer(config, data, val, progress=progress, log=log)
    if resume is not None:
        trainer.load_checkpoint(resume)
        (log or (lambda m: None))(f"resumed from {resume} after epoch {trainer.epoch}")
    result = trainer.fit(checkpoint_dir)
    if out is not None:
        result.descriptor.save(out)
    return result


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no such checkpoint: {path}") from None
    except Exception as exc:
        raise ValueError(f"{path} is not a readable training checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cbir training checkpoint")
    return state


def default_checkpoint_dir(out: str | os.PathLike) -> Path:
    """``model.cbir`` -> ``model.ckpt/`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".ckpt")


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _np_state_from(d: dict[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _py_state() -> tuple:
    version, internal, gauss = random.getstate()
    return version, list(internal), gauss


def _py_state_from(s: list) -> tuple:
    version, internal, gauss = s
    return version, tuple(internal), gauss
