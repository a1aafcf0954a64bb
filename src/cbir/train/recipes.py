"""Named sets of training settings: ``cbir train --recipe cpu|paper``.

A recipe fills in every setting the user did not give; an option given explicitly always
wins (:func:`resolve_recipe`). Two recipes, for two budgets:

``cpu`` (the default)
    What validation chose for a CPU budget of about an hour (bench/finetune.py and
    docs/benchmarks/2026-11-23-finetune.md: +3.54 mAP on gpr-mini for EfficientNet-Lite0
    on train-pool in 59 minutes on 2 cores): 200 tuples per epoch, 5 negatives from a pool
    of 500, queries uniform over classes, contrastive margin 1.0, Adam lr 2e-5, the first
    40% of the backbone frozen, the model's own input size, 50 epochs (that run kept epoch
    46 of 49), the epoch with the best validation mAP kept.

``paper``
    Radenovic, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation"
    (TPAMI 2018), as its released code trains (cirtorch ``examples/train.py`` defaults):
    Adam lr 1e-6 with decay exp(-0.01) per epoch, weight decay 1e-6, contrastive margin
    0.7, 2,000 queries per epoch, 5 hard negatives mined from a pool of 20,000 images,
    batch 5 tuples, 100 epochs, nothing frozen, queries uniform over images, training
    images at 362 pixels on the longer side (the size of the README's training example).
    On a GPU. (Their ResNet-101 example uses lr 5e-7, margin 0.85 and a 22,000 pool: give
    those options explicitly to reproduce it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """A named set of :class:`cbir.train.TrainConfig` values and where they come from."""

    name: str
    summary: str
    source: str
    settings: dict[str, Any]


RECIPES: dict[str, Recipe] = {
    "cpu": Recipe(
        name="cpu",
        summary="an hour on a CPU: 200 tuples/epoch, pool 500, lr 2e-5, margin 1.0, 40% frozen, class sampling",
        source="chosen by validation on train-pool (bench/finetune.py, docs/benchmarks/2026-11-23-finetune.md)",
        settings={
            "epochs": 50,
            "max_tuples": 200,
            "negatives": 5,
            "pool_size": 500,
            "batch_size": 5,
            "lr": 2e-5,
            "weight_decay": 1e-6,
            "lr_decay": math.exp(-0.01),
            "loss": "contrastive",
            "margin": 1.0,
            "freeze": 0.4,
            "freeze_bn": True,
            "sampling": "class",
            "augment": False,
            "image_size": None,
        },
    ),
    "paper": Recipe(
        name="paper",
        summary="Radenovic et al. 2018 on a GPU: 2,000 queries/epoch, pool 20,000, lr 1e-6, margin 0.7, 362 px",
        source="Radenovic, Tolias & Chum, TPAMI 2018; cirtorch examples/train.py defaults",
        settings={
            "epochs": 100,
            "max_tuples": 2000,
            "negatives": 5,
            "pool_size": 20000,
            "batch_size": 5,
            "lr": 1e-6,
            "weight_decay": 1e-6,
            "lr_decay": math.exp(-0.01),
            "loss": "contrastive",
            "margin": 0.7,
            "freeze": 0.0,
            "freeze_bn": True,
            "sampling": "image",
            "augment": False,
            "image_size": 362,
        },
    ),
}

DEFAULT_RECIPE = "cpu"


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}: choose from {sorted(RECIPES)}") from None


def resolve_recipe(name: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The recipe's settings with every explicitly given value (not ``None``) on top.

    ``explicit`` maps :class:`~cbir.train.TrainConfig` field names to what the user gave;
    ``None`` means "not given". Keys the recipe does not set pass through unchanged. A loss
    other than the recipe's, given without a margin, gets its own default margin
    (:data:`cbir.train.losses.DEFAULT_MARGINS`), not the recipe's contrastive one.
    """
    out = dict(get_recipe(name).settings)
    given = {k: v for k, v in explicit.items() if v is not None}
    out.update(given)
    if "loss" in given and "margin" not in given and given["loss"] != get_recipe(name).settings.get("loss"):
        out["margin"] = None  # the recipe's margin is for its own loss: use the chosen loss's default
    return out


def recipes_help() -> str:
    """One line per recipe, for ``cbir train --help``."""
    return "; ".join(
        f"{r.name}{' (default)' if r.name == DEFAULT_RECIPE else ''}: {r.summary}" for r in RECIPES.values()
    )
