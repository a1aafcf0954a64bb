"""Models: backbones, pooling, whitening, and the descriptor that joins them."""

from cbir.models.backbones import (
    DEFAULT_BACKBONE,
    Backbone,
    BackboneError,
    BackboneSpec,
    available_backbones,
    build_backbone,
)
from cbir.models.descriptor import RADENOVIC_SCALES, Descriptor, build_descriptor
from cbir.models.pooling import GeM, build_pooling, gem, l2n, mac, rgem, rmac, spoc
from cbir.models.whitening import (
    Whitening,
    fit_learned_whitening,
    fit_pca_whitening,
    pairs_from_labels,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "RADENOVIC_SCALES",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "Descriptor",
    "GeM",
    "Whitening",
    "available_backbones",
    "build_backbone",
    "build_descriptor",
    "build_pooling",
    "fit_learned_whitening",
    "fit_pca_whitening",
    "gem",
    "l2n",
    "mac",
    "pairs_from_labels",
    "rgem",
    "rmac",
    "spoc",
]
