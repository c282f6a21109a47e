"""Classifier-free guidance as the formula says, for every pipeline a task uses."""

from __future__ import annotations

from typing import Any


def use_formula_guidance(pipe: Any) -> None:
    """Make guidance follow ε = ε_uncond + g·(ε_cond − ε_uncond) for every g ≥ 0.

    diffusers skips the unconditional branch for g ≤ 1 (using ε_cond alone),
    which is right at g = 1 but not below it: g = 0 should give the model's
    unconditional prediction. We keep diffusers' shortcut only at exactly 1.
    """
    cls = type(pipe)
    if getattr(cls, "_sdcli_formula_guidance", False) or not hasattr(cls, "do_classifier_free_guidance"):
        return

    def do_cfg(self) -> bool:
        return self._guidance_scale != 1 and self.unet.config.time_cond_proj_dim is None

    pipe.__class__ = type(cls.__name__, (cls,), {"_sdcli_formula_guidance": True,
                                                 "do_classifier_free_guidance": property(do_cfg)})
