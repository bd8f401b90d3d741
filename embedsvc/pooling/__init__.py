"""Pooling library: pure functions over token features, and a registry that names them."""

from embedsvc.pooling.functional import l2_normalize, masked_max, masked_mean, signed_gem
from embedsvc.pooling.netvlad import NetVLADState, fit_netvlad, netvlad
from embedsvc.pooling.registry import (
    POOLINGS,
    BoundPooling,
    PoolingDef,
    PoolingSpec,
    apply_poolings,
    bind_pooling,
    image_token_modes,
    params_to_strings,
)
from embedsvc.pooling.spp import pyramid_regions, spatial_pyramid

__all__ = [
    "POOLINGS",
    "BoundPooling",
    "NetVLADState",
    "PoolingDef",
    "PoolingSpec",
    "apply_poolings",
    "bind_pooling",
    "fit_netvlad",
    "image_token_modes",
    "l2_normalize",
    "masked_max",
    "masked_mean",
    "netvlad",
    "params_to_strings",
    "pyramid_regions",
    "signed_gem",
    "spatial_pyramid",
]
