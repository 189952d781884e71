"""The tiny pipeline of every family: an offline round trip, and float16-only overflow at every site."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_finite
from diffusers import (
    DiffusionPipeline,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from guarded_diffusers.testing import FAMILIES, TINY

PIPELINE_CLASSES = {
    "flux_fill": FluxFillPipeline,
    "flux": FluxPipeline,
    "flux_kontext": FluxKontextPipeline,
    "qwen": QwenImagePipeline,
    "sd3": StableDiffusion3Pipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd15": StableDiffusionPipeline,
}
# Flux Fill's sites, the silently clipped ones included, are tested in test_testing.py.
FAMILY_SITES = [
    (family, site) for family, spec in FAMILIES.items() if family != "flux_fill" for site in spec.sites
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``saved(family, site)`` -> the folder of that tiny pipeline, saved once per module."""
    cache: dict[tuple[str, str | None], Path] = {}

    def get(family: str, site: str | None = None) -> Path:
        if (family, site) not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{site or 'clean'}")
            FAMILIES[family].save(folder, site)
            cache[family, site] = folder
        return cache[family, site]

    return get


def load(folder: Path, dtype: torch.dtype, force_upcast: bool = False) -> DiffusionPipeline:
    """Load the way users do; float16 runs every module in float16 unless ``force_upcast`` is kept."""
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if not force_upcast:
        pipe.vae.register_to_config(force_upcast=False)
    return pipe


def images(family: str, pipe: DiffusionPipeline) -> np.ndarray:
    return pipe(**FAMILIES[family].call_kwargs()).images


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_family_round_trips_offline_as_its_own_class_and_is_finite_in_float16(saved, family):
    pipe = load(saved(family), torch.float16)
    assert type(pipe) is PIPELINE_CLASSES[family]
    assert pipe.vae.dtype == torch.float16
    output = images(family, pipe)
    assert output.shape == (1, 32, 32, 3)
    assert all_finite(output)


@pytest.mark.parametrize(("family", "site"), FAMILY_SITES)
def test_injected_family_overflows_only_in_float16(saved, family, site):
    folder = saved(family, site)
    for dtype in (torch.float32, torch.bfloat16):
        assert all_finite(images(family, load(folder, dtype))), dtype
    assert not all_finite(images(family, load(folder, torch.float16)))


def test_sdxl_force_upcast_decodes_an_overflowing_decoder_in_float32_and_returns_it_to_float16(saved):
    pipe = load(saved("sdxl", "vae_decoder"), torch.float16, force_upcast=True)
    assert all_finite(images("sdxl", pipe))
    assert pipe.vae.dtype == torch.float16


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_names_a_module_whose_weights_it_changed(family):
    spec = FAMILIES[family]
    clean = spec.build(0, TINY)
    for site in spec.sites:
        pipe = spec.build(0, TINY)
        component, _, path = spec.inject(pipe, site).partition(".")
        injected = getattr(pipe, component).get_submodule(path).weight
        assert not torch.equal(injected, getattr(clean, component).get_submodule(path).weight), site


def test_unknown_site_names_the_family_sites():
    pipe = FAMILIES["sd15"].build(0, TINY)
    with pytest.raises(
        ValueError, match=r"Unknown injection site 'nope'.*unet_mid_ff, clip_mlp, vae_decoder"
    ):
        FAMILIES["sd15"].inject(pipe, "nope")
