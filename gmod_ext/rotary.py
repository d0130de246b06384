"""Rotations of q / k that models write as complex products (DeepSeek-V2, Llama-4).

Their rotary modules return ``freqs_cis = polar(1, angle)`` (times a scaling) instead of a (cos, sin) pair,
and ``apply_rotary_emb`` multiplies consecutive pairs of q / k, read as complex numbers, by it: the
interleaved rotation, computed in float32 complex. MoD layers gather the real and imaginary parts as the
cos / sin rows of the kept tokens (``mod_layer._cos_sin``) and rotate with :func:`complex_rotation`, the
same arithmetic.
"""
from __future__ import annotations

import torch

__all__ = ["complex_rotation"]


def complex_rotation(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 2):
    """q / k [B, C, H, r] with consecutive pairs as complex numbers, times ``cos + i sin`` [B, C, r / 2] (the
    real and imaginary parts of the model's ``freqs_cis``, float32), in float32 complex, then back to each
    input's dtype (``apply_rotary_emb``'s arithmetic)."""
    freqs = torch.complex(cos.float(), sin.float()).unsqueeze(unsqueeze_dim)

    def one(t):
        z = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(z * freqs).flatten(-2).type_as(t)

    return one(q), one(k)
