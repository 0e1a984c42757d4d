"""Structured rotations whose storage and online cost grow linearly in ``d`` (docs/design.md §2.3).

A dense Householder rotation (``k = d`` reflections) costs ``d²`` to store and
``n·d²`` to apply to ``n`` rows. Two structures avoid that:

* ``KroneckerRotation``: ``R = diag(s) · (A ⊗ B)`` with ``d = a·b``, ``A`` and
  ``B`` full Householder products (``a`` and ``b`` reflections, WY form) and
  ``s`` fixed random signs. For a row ``x`` viewed row-major as an ``a × b``
  matrix ``X``, ``x (A ⊗ B) = vec_row(Aᵀ X B)``: two small matmuls, never a
  ``d × d`` matrix. ``a² + b²`` parameters; ``n·d·(a + b)`` work.
* ``HadamardHouseholderRotation``: ``R = F · H(v_k)⋯H(v_1)`` with the fixed
  ``F = diag(s) · (Hadamard(2^m)/√2^m ⊗ DCT(b))``, ``d = 2^m·b``, then ``k``
  learned reflections. ``F`` holds no parameters: it is rebuilt from ``d`` and
  the stored signs. The reflections are PCA-initialized on the covariance of
  ``x F``, so they flatten what the Hadamard left.

Both implement ``rotation.Rotation``: ``rotate`` (``x R``), ``rotate_transposed``
(``x Rᵀ``), ``rotate_weight`` (``W R``), ``matrix()`` and ``spec()``, so the
block, fold, export and the loader never look at which structure they hold.
``make_rotation`` builds any structure by name.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from .rotation import (
    DENSE_APPLY_RATIO,
    HouseholderRotation,
    Rotation,
    as_dtype,
    autocast_off,
    dct_matrix,
    power_of_two_factor,
    sylvester_hadamard,
)

RotationStructure = Literal["householder", "kronecker", "hadamard_householder"]
ROTATION_STRUCTURES: tuple[str, ...] = ("householder", "kronecker", "hadamard_householder")
# The inits each structure accepts (``rotation_init``); a structure's docstring says what each means.
STRUCTURE_INITS: dict[str, tuple[str, ...]] = {
    "householder": ("identity", "random", "hadamard", "pca"),
    "kronecker": ("identity", "random", "hadamard"),
    "hadamard_householder": ("identity", "random", "pca"),
}


def balanced_factors(dim: int) -> tuple[int, int]:
    """The factor pair ``a ≤ b`` of ``dim`` with ``a`` as close to ``√dim`` as possible.

    576 → (24, 24), 896 → (28, 32), 1536 → (32, 48), 4864 → (64, 76),
    18944 → (128, 148). A prime ``dim`` gives ``(1, dim)``: no saving.
    """
    if dim < 1:
        raise ValueError(f"dim={dim} must be positive")
    a = math.isqrt(dim)
    while dim % a:
        a -= 1
    return a, dim // a


def kronecker_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``x (F_1 ⊗ F_2 ⊗ ⋯ ⊗ F_r)`` for rows ``x`` of shape ``(..., Π f_i)``.

    ``x`` is viewed row-major as a ``(..., f_1, …, f_r)`` tensor and each
    ``F_i`` (``f_i × f_i``) contracts its axis: ``Σ_r f_i`` multiply-adds per
    entry instead of ``Π f_i``. Autocast does not reach it (``rotation.autocast_off``).
    """
    with autocast_off(x.device):
        return _kronecker_apply(x, factors)


def _kronecker_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    sizes = [factor.shape[0] for factor in factors]
    lead = x.shape[:-1]
    if len(factors) == 2:
        # vec_row(Aᵀ X B): both products as (broadcast) batched matmuls on the contiguous (n, a, b)
        # view, which avoids the permuted copies of the general path below.
        first, second = factors
        out = torch.matmul(first.T, x.reshape(-1, *sizes) @ second)
        return out.reshape(*lead, x.shape[-1])
    out = x.reshape(-1, *sizes)
    for factor in factors:
        # Contract axis 1 and append the result axis last: after r steps the order is f_1..f_r again.
        out = torch.tensordot(out, factor, dims=([1], [0]))
    return out.reshape(*lead, x.shape[-1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _random_signs(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(torch.int8)


class KroneckerRotation(Rotation):
    """``R = diag(s) · (A ⊗ B)``, each factor a full Householder product in WY form.

    Args:
        dim: ``d = a·b``.
        init: ``identity`` (``A = B = I``, ``s = 1``), ``random`` (random
            reflections, ``s = 1``), or ``hadamard``: each factor a randomized
            Hadamard-like matrix of its size and ``s`` random signs, as flat as a
            dense randomized Hadamard start.
        seed: seeds the factors' reflections and the signs.
        factors: ``(a, b)``; default ``balanced_factors(dim)``.
    """

    structure = "kronecker"

    def __init__(self, dim: int, init: str = "hadamard", seed: int = 0,
                 factors: tuple[int, int] | None = None) -> None:
        super().__init__()
        if init not in STRUCTURE_INITS[self.structure]:
            raise ValueError(f"init={init!r} is not one of {STRUCTURE_INITS[self.structure]} for a kronecker rotation")
        a, b = balanced_factors(dim) if factors is None else (int(factors[0]), int(factors[1]))
        if a * b != dim or a < 1 or b < 1:
            raise ValueError(f"factors ({a}, {b}) do not multiply to dim={dim}")
        self.dim, self.init = dim, init
        self.factors = (a, b)
        self.factor_a = HouseholderRotation(a, a, init=init, seed=seed)
        self.factor_b = HouseholderRotation(b, b, init=init, seed=seed + 1)
        signs = _random_signs(dim, seed + 2) if init == "hadamard" else torch.ones(dim, dtype=torch.int8)
        self.register_buffer("signs", signs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, factors={self.factors}, init={self.init}"

    def spec(self) -> dict[str, Any]:
        return {"structure": self.structure, "dim": self.dim, "factors": list(self.factors)}

    def _factor_matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: full factors (k = a, k = b), whose ``matrix()`` is reused across calls without gradients."""
        return self.factor_a.matrix().to(dtype), self.factor_b.matrix().to(dtype)

    def build_inference_cache_(self, dtype: torch.dtype = torch.float32) -> "KroneckerRotation":
        self.factor_a.build_inference_cache_(dtype)
        self.factor_b.build_inference_cache_(dtype)
        return self

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R = vec_row(Aᵀ X B)`` of ``x ⊙ s``, ``x``: ``(..., d)``."""
        dtype = _compute_dtype(x)
        a, b = self._factor_matrices(dtype)
        return kronecker_apply(x.to(dtype) * self.signs.to(dtype), [a, b]).to(x.dtype)

    def rotate_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x Rᵀ = (x (Aᵀ ⊗ Bᵀ)) ⊙ s``."""
        dtype = _compute_dtype(x)
        a, b = self._factor_matrices(dtype)
        return (kronecker_apply(x.to(dtype), [a.T, b.T]) * self.signs.to(dtype)).to(x.dtype)


class HadamardHouseholderRotation(Rotation):
    """``R = F · H(v_k)⋯H(v_1)``: a fixed randomized Hadamard ``F``, then ``k`` learned reflections.

    ``F = diag(s) · (Hadamard(2^m)/√2^m ⊗ DCT(b))`` with ``d = 2^m·b``,
    regrouped as ``diag(s) · (F_a ⊗ F_b)`` with ``F_a = Hadamard(p)/√p`` and
    ``F_b = Hadamard(2^m/p)/√(2^m/p) ⊗ DCT(b)`` (Sylvester Hadamards factor
    exactly), ``p`` chosen so ``p + d/p`` is smallest: ``O(d·(p + d/p))`` per
    row, as cheap as a Kronecker rotation, no parameters. Only the signs ``s``
    (int8) are stored; the factors are rebuilt from ``d``.

    Args:
        dim: ``d``.
        num_reflections: ``k`` (0 ≤ k ≤ d; 0 leaves the fixed Hadamard alone).
        init: the reflections' start: ``identity``, ``random``, or ``pca``
            (identity until ``init_pca_`` gets a covariance of the unrotated input).
        seed: seeds the signs and the identity/random reflections.
        dense_apply_ratio: see ``HouseholderRotation``.
    """

    structure = "hadamard_householder"

    def __init__(self, dim: int, num_reflections: int, init: str = "pca", seed: int = 0,
                 dense_apply_ratio: float = DENSE_APPLY_RATIO) -> None:
        super().__init__()
        if init not in STRUCTURE_INITS[self.structure]:
            raise ValueError(f"init={init!r} is not one of {STRUCTURE_INITS[self.structure]} "
                             "for a hadamard_householder rotation")
        if not 0 <= num_reflections <= dim:
            raise ValueError(f"num_reflections={num_reflections} must be in [0, dim={dim}]")
        self.dim, self.num_reflections, self.init, self.seed = dim, num_reflections, init, seed
        order = power_of_two_factor(dim)
        p = min((2**i for i in range(order.bit_length())), key=lambda size: size + dim // size)
        factor_a = sylvester_hadamard(p, torch.float64) / math.sqrt(p)
        factor_b = torch.kron(sylvester_hadamard(order // p, torch.float64) / math.sqrt(order // p),
                              dct_matrix(dim // order, torch.float64))
        self._fixed_names: list[str] = []
        for name, matrix in (("fixed_a", factor_a), ("fixed_b", factor_b)):
            if matrix.shape[0] > 1:
                # Rebuilt from dim on load, never saved.
                self.register_buffer(name, matrix.float(), persistent=False)
                self._fixed_names.append(name)
        self.register_buffer("signs", _random_signs(dim, seed))
        self._fixed_cache: dict[tuple, tuple] = {}  # inference only: see _fixed_operands
        self.reflections = (HouseholderRotation(dim, num_reflections, init=init, seed=seed + 1,
                                                dense_apply_ratio=dense_apply_ratio)
                            if num_reflections else None)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_reflections={self.num_reflections}, init={self.init}"

    def spec(self) -> dict[str, Any]:
        return {"structure": self.structure, "dim": self.dim, "reflections": self.num_reflections,
                "seed": self.seed}

    @property
    def supports_pca(self) -> bool:
        return self.reflections is not None

    def _fixed_operands(self, device: torch.device, dtype: torch.dtype,
                        transpose: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(signs, factors)`` of ``F`` (``transpose``: of ``Fᵀ``) on ``device`` in ``dtype``.

        Without autograd they are cached: casting the int8 signs and each factor again at every call
        was half of a decoding step's rotation time. The factors are a function of ``d`` alone; the
        signs are checked by identity and version, so ``.to()`` and ``load_state_dict`` refresh the
        cache. With autograd (training, ``torch.compile``) nothing is cached.
        """
        signs = self.signs
        key = (device, dtype, transpose)
        grad = torch.is_grad_enabled()
        if not grad:
            cached = self._fixed_cache.get(key)
            if cached is not None and cached[0] is signs and cached[1] == signs._version:
                return cached[2]
        factors = [getattr(self, name).to(device=device, dtype=dtype) for name in self._fixed_names]
        operands = (signs.to(device=device, dtype=dtype), [factor.T for factor in factors] if transpose else factors)
        if not grad:
            self._fixed_cache[key] = (signs, signs._version, operands)
        return operands

    def build_inference_cache_(self, dtype: torch.dtype = torch.float32) -> "HadamardHouseholderRotation":
        with torch.no_grad():
            self._fixed_operands(self.signs.device, torch.promote_types(dtype, torch.float32), False)
        if self.reflections is not None:
            self.reflections.build_inference_cache_(dtype)
        return self

    def fixed_rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x F`` (the fixed part alone), ``x``: ``(..., d)``."""
        dtype = _compute_dtype(x)
        signs, factors = self._fixed_operands(x.device, dtype, False)
        signed = as_dtype(x, dtype) * signs
        return as_dtype(kronecker_apply(signed, factors) if factors else signed, x.dtype)

    def fixed_rotate_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x Fᵀ``."""
        dtype = _compute_dtype(x)
        signs, factors = self._fixed_operands(x.device, dtype, True)
        out = as_dtype(x, dtype)
        if factors:
            out = kronecker_apply(out, factors)
        return as_dtype(out * signs, x.dtype)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R = (x F) H(v_k)⋯H(v_1)``."""
        out = self.fixed_rotate(x)
        return out if self.reflections is None else self.reflections.rotate(out)

    def rotate_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x Rᵀ``: the reflections' transpose first, then ``Fᵀ``."""
        out = x if self.reflections is None else self.reflections.rotate_transposed(x)
        return self.fixed_rotate_transposed(out)

    @torch.no_grad()
    def init_pca_(self, covariance: torch.Tensor, seed: int = 0) -> None:
        """PCA-initialize the reflections on ``Fᵀ C F``, the covariance of ``x F`` (``C`` of ``x``)."""
        if self.reflections is None:
            return
        if covariance.shape != (self.dim, self.dim):
            raise ValueError(f"covariance shape {tuple(covariance.shape)} != ({self.dim}, {self.dim})")
        rotated = self.fixed_rotate(covariance.float())            # C F
        rotated = self.fixed_rotate(rotated.T.contiguous()).T      # Fᵀ C F (C symmetric)
        self.reflections.init_pca_((rotated + rotated.T) / 2, seed=seed)


def make_rotation(structure: str, dim: int, reflections: int, init: str, seed: int,
                  dense_apply_ratio: float = DENSE_APPLY_RATIO) -> Rotation:
    """A rotation of size ``dim`` with the given ``structure``.

    ``reflections`` is the learned reflection count of ``householder`` (where
    ``init='hadamard'`` needs ``dim``) and ``hadamard_householder``; a
    ``kronecker`` rotation always has full factors. ``dense_apply_ratio``:
    see ``HouseholderRotation``.
    """
    if structure not in ROTATION_STRUCTURES:
        raise ValueError(f"structure={structure!r} is not one of {ROTATION_STRUCTURES}")
    if init not in STRUCTURE_INITS[structure]:
        raise ValueError(f"init={init!r} is not available for the {structure!r} structure; "
                         f"choose one of {STRUCTURE_INITS[structure]}")
    if structure == "householder":
        return HouseholderRotation(dim, reflections, init=init, seed=seed, dense_apply_ratio=dense_apply_ratio)
    if structure == "kronecker":
        return KroneckerRotation(dim, init=init, seed=seed)
    return HadamardHouseholderRotation(dim, reflections, init=init, seed=seed, dense_apply_ratio=dense_apply_ratio)


def rotation_parameter_count(rotation: nn.Module) -> int:
    """Stored numbers of a rotation: its parameters and persistent buffers (e.g. signs)."""
    return sum(t.numel() for t in rotation.state_dict().values())
