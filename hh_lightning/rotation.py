"""Orthogonal transforms built from Householder reflections.

Conventions used everywhere in the package:

* A reflection is ``H(v) = I - 2 v vᵀ / (vᵀv)``; the module stores ``k`` vectors
  ``v_1..v_k`` as the rows of ``vectors`` (shape ``(k, d)``) and represents
  ``R = H(v_k) ⋯ H(v_1)``.
* Inputs are row vectors. ``rotate(x)`` computes ``x R`` and
  ``rotate_transposed(x)`` computes ``x Rᵀ``. For a linear ``y = x Wᵀ`` the
  input becomes ``x R`` and the weight ``W R`` (rows of ``W`` rotated like
  inputs), so ``(x R)(W R)ᵀ = x Wᵀ``.
* Compact WY form (Schreiber & Van Loan; the "UT transform" of Joffrain et al.):
  with ``Y = vectorsᵀ`` (``d × k``, not normalized) and
  ``U = striu(YᵀY) + diag(YᵀY) / 2`` (upper triangular),
  ``H(v_1) ⋯ H(v_k) = I - Y U⁻¹ Yᵀ``, hence ``R = I - Y U⁻ᵀ Yᵀ``. Applying it
  to ``n`` rows costs two thin GEMMs and one ``n × k`` triangular solve.
* A zero vector is an inactive reflection: it acts as the identity. Its
  diagonal entry of ``U`` is replaced by 1 so ``U`` stays invertible; the
  vector's column of ``Y`` is zero, so that entry never reaches the output.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Literal

import torch
from torch import nn

RotationInit = Literal["identity", "random", "hadamard", "pca"]
# At inference a product of k ≥ ratio·d reflections is applied as its dense matrix (n·d² multiply-adds)
# rather than as two thin WY GEMMs (2·n·d·k): equal cost at k = d/2.
DENSE_APPLY_RATIO = 0.5
ROTATION_INITS: tuple[str, ...] = ("identity", "random", "hadamard", "pca")


# --------------------------------------------------------------------------
# Flat (Hadamard-like) matrices
# --------------------------------------------------------------------------
def power_of_two_factor(dim: int) -> int:
    """The largest power of two dividing ``dim`` (896 -> 128, 576 -> 64)."""
    return dim & (-dim)


def sylvester_hadamard(order: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unnormalized ±1 Hadamard matrix of a power-of-two ``order``."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"order={order} must be a power of two")
    matrix = torch.ones(1, 1, dtype=dtype)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def flat_targets(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal vectors whose entries are all ``±1/√dim``, as rows.

    For ``dim = m·b`` with ``m`` the largest power of two dividing ``dim``, the
    rows of ``Hadamard(m) ⊗ 1_b`` scaled by ``1/√dim`` give ``m`` of them.
    Returns shape ``(m, dim)``.
    """
    order = power_of_two_factor(dim)
    block = dim // order
    rows = torch.kron(sylvester_hadamard(order, dtype), torch.ones(1, block, dtype=dtype))
    return rows / math.sqrt(dim)


def dct_matrix(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``(dim, dim)``; dense with entries ``≤ √(2/dim)``."""
    n = torch.arange(dim, dtype=torch.float64)
    basis = torch.cos(math.pi / dim * (n[None, :] + 0.5) * n[:, None]) * math.sqrt(2.0 / dim)
    basis[0] /= math.sqrt(2.0)
    return basis.to(dtype)


def hadamard_like(dim: int, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dense orthogonal ``(dim, dim)`` matrix with near-flat entries, for any ``dim``.

    ``diag(s) · (Hadamard(m)/√m ⊗ DCT(b))`` with random signs ``s`` (QuaRot's
    randomized Hadamard); for a power-of-two ``dim`` it is an exact randomized
    Hadamard matrix, otherwise entries are at most ``√2/√dim``.
    """
    order = power_of_two_factor(dim)
    block = dim // order
    matrix = torch.kron(sylvester_hadamard(order, torch.float64) / math.sqrt(order),
                        dct_matrix(block, torch.float64))
    signs = torch.randint(0, 2, (dim,), generator=generator).to(torch.float64) * 2 - 1
    return (signs[:, None] * matrix).to(dtype)


# --------------------------------------------------------------------------
# Functional core (usable without the module)
# --------------------------------------------------------------------------
def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region autocast does not reach (Lightning's ``bf16-mixed`` runs the forward under it):
    every rotation's arithmetic stays in its float32 (or wider) compute dtype, so the rotated
    rows do not depend on the precision setting, and the triangular solve has no bf16 kernel.
    A no-op where autocast is off or absent (``meta``), which costs a tenth of entering it: the
    deployed model decodes one row at a time through several rotations a layer."""
    kind = device.type
    if not (_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return _NO_CONTEXT
    return torch.autocast(device_type=kind, enabled=False)


_autocast_available = functools.lru_cache(maxsize=None)(torch.amp.is_autocast_available)
_NO_CONTEXT = contextlib.nullcontext()  # reusable: it holds nothing


def _triangular_factor(vectors: torch.Tensor) -> torch.Tensor:
    """``U = striu(V Vᵀ) + diag(V Vᵀ)/2`` for ``vectors`` ``V`` of shape ``(k, d)``.

    Inactive (zero) vectors get a unit diagonal so ``U`` stays invertible.
    """
    gram = vectors @ vectors.T
    half_norms = torch.diagonal(gram) / 2
    inactive = half_norms <= torch.finfo(vectors.dtype).tiny
    diagonal = torch.where(inactive, torch.ones_like(half_norms), half_norms)
    return torch.triu(gram, diagonal=1) + torch.diag(diagonal)


ApplyMethod = Literal["auto", "wy", "wy_vectors", "materialized"]


def _apply_costs(rows: int, num_reflections: int, dim: int) -> dict[str, int]:
    """Multiply-adds of each way to compute ``x R`` for ``rows`` rows (the Gram matrix, ``k²d``, is shared).

    ``wy``: solve the ``n × k`` projections (``nk²``); ``wy_vectors``: solve
    against the ``k × d`` vectors instead (``k²d``), better when ``n > d``;
    ``materialized``: build dense ``R`` (``+ d²k``) and do one ``n × d × d`` GEMM.
    """
    n, k, d = rows, num_reflections, dim
    return {"wy": n * k * k + 2 * n * d * k, "wy_vectors": k * k * d + 2 * n * d * k,
            "materialized": k * k * d + d * d * k + n * d * d}


def householder_apply(x: torch.Tensor, vectors: torch.Tensor, transpose: bool = False,
                      method: ApplyMethod = "auto") -> torch.Tensor:
    """Apply ``R = H(v_k)⋯H(v_1)`` to the rows of ``x`` through the WY form.

    ``x``: ``(..., d)``; ``vectors``: ``(k, d)``. Returns ``x R`` (or ``x Rᵀ`` with
    ``transpose=True``) in ``x``'s dtype. ``method='auto'`` picks the cheapest of
    three exact evaluation orders by multiply-add count (``_apply_costs``). The
    arithmetic runs in float32 at least, since the triangular solve is
    sensitive to bf16 rounding, and autocast is switched off around it.
    """
    with autocast_off(x.device):
        return _householder_apply(x, vectors, transpose, method)


def _householder_apply(x: torch.Tensor, vectors: torch.Tensor, transpose: bool, method: ApplyMethod) -> torch.Tensor:
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    v = vectors.to(compute_dtype)
    rows = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    if method == "auto":
        costs = _apply_costs(rows.shape[0], v.shape[0], v.shape[1])
        method = min(costs, key=costs.__getitem__)
    factor = _triangular_factor(v)
    # x R = x - (x Y) U⁻ᵀ Yᵀ and x Rᵀ = x - (x Y) U⁻¹ Yᵀ (Y = vᵀ): the solve is against Uᵀ or U.
    solve_factor, upper = (factor, True) if transpose else (factor.T, False)
    if method == "wy":
        coefficients = torch.linalg.solve_triangular(solve_factor, rows @ v.T, upper=upper, left=False)
        out = rows - coefficients @ v
    else:
        # The same product associated the other way: Z = U⁻ᵀ V (or U⁻¹ V), x R = x - (x Vᵀ) Z.
        solved = torch.linalg.solve_triangular(solve_factor, v, upper=upper)
        if method == "wy_vectors":
            out = rows - (rows @ v.T) @ solved
        else:
            out = rows - rows @ (v.T @ solved)
    return out.reshape(x.shape).to(x.dtype)


def householder_apply_loop(x: torch.Tensor, vectors: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Reference: apply the reflections one by one (``O(k)`` sequential ops).

    Row vectors see ``x R = x H(v_k)ᵀ⋯`` — since each ``H`` is symmetric,
    ``x R = (((x H_k) H_{k-1}) ⋯ H_1)`` and ``x Rᵀ = (((x H_1) H_2) ⋯ H_k)``.
    """
    order = range(vectors.shape[0]) if transpose else reversed(range(vectors.shape[0]))
    out = x
    for index in order:
        v = vectors[index]
        norm_sq = v @ v
        if norm_sq <= torch.finfo(v.dtype).tiny:
            continue
        out = out - (2.0 / norm_sq) * (out @ v)[..., None] * v
    return out


def householder_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Dense ``R`` (``d × d``) for ``vectors`` of shape ``(k, d)``."""
    eye = torch.eye(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    return householder_apply(eye, vectors)


def reflections_from_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """Householder vectors ``(d, d)`` whose ``R`` equals ``matrix`` up to row signs.

    Uses LAPACK's QR (``geqrf``): ``A = H_1⋯H_d · diag(±1)``, so
    ``Rᵀ = H_1⋯H_d = A·diag(±1)`` and ``R = diag(±1)·Aᵀ``. A flat ``A`` stays flat.
    """
    dim = matrix.shape[0]
    packed, tau = torch.geqrf(matrix.to(torch.float64))
    vectors = torch.tril(packed, diagonal=-1).T.clone()  # row i holds v_i below the unit entry
    vectors[torch.arange(dim), torch.arange(dim)] = 1.0
    # LAPACK's H_i = I - τ v vᵀ is a true reflection iff τ = 2/(vᵀv); τ = 0 means identity.
    vectors[tau == 0] = 0.0
    return vectors.to(matrix.dtype)


# Subspace iteration settings of top_eigenvectors. On SmolLM2's rotated block covariances (d = 576 and
# 1536, k = 32), 8 iterations with a basis of 2k vectors capture 99.99% or more of the top-k variance
# eigh captures, in 12-55 ms against eigh's 30-340 ms (2 CPU threads).
SUBSPACE_ITERATIONS = 8
SUBSPACE_BASIS_PER_VECTOR = 2
EXACT_EIGH_RATIO = 8  # below d = 8 · basis size, eigh is cheap enough: solve exactly


def top_eigenvectors(covariance: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading eigenvectors of a symmetric PSD ``(d, d)`` matrix, as rows, largest first.

    float32. For ``count`` well below ``d``, by subspace iteration from a fixed random start
    (deterministic): its cost grows as ``d²·count`` where ``eigh``'s grows as ``d³``. Vectors of
    near-equal eigenvalues are then any orthonormal basis of their span, as they are from
    ``eigh``; the flat mapping below is exact for whatever orthonormal vectors it gets.
    """
    covariance = covariance.float()
    dim = covariance.shape[0]
    basis_size = SUBSPACE_BASIS_PER_VECTOR * count
    if count == 0 or dim < EXACT_EIGH_RATIO * basis_size:
        _, eigenvectors = torch.linalg.eigh(covariance)
        return eigenvectors[:, dim - count:].flip(1).T.contiguous()
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(dim, basis_size, generator=generator).to(covariance.device)
    for _ in range(SUBSPACE_ITERATIONS):
        basis, _ = torch.linalg.qr(covariance @ basis)
    # Rayleigh-Ritz: the best vectors within the converged subspace.
    _, small = torch.linalg.eigh(basis.T @ covariance @ basis)
    return (basis @ small[:, basis_size - count:]).flip(1).T.contiguous()


def pca_flat_reflections(covariance: torch.Tensor, num_reflections: int) -> torch.Tensor:
    """Reflection vectors mapping the top principal directions onto flat ones.

    ``covariance``: ``(d, d)``, e.g. ``XᵀX/N`` of the rows ``x`` that will be
    rotated as ``x R``. Returns ``(k', d)`` vectors, ``k' = min(k, m)`` with
    ``m`` the number of available flat targets (``flat_targets``). With
    ``R`` built from them, ``u_i R`` (a row vector) is ``±h_i`` for each of
    the top-``k'`` eigenvectors ``u_i``: row vectors see ``Rᵀ``, so the
    reflections are built as ``G = g_{k'}⋯g_1`` with ``G u_i = ±h_i`` and
    stored in reverse order (``Rᵀ = H_1⋯H_{k'} = G``).
    """
    dim = covariance.shape[0]
    targets = flat_targets(dim, torch.float64).to(covariance.device)
    count = min(num_reflections, targets.shape[0])
    if count == 0:
        return covariance.new_zeros(0, dim)
    # Row i becomes u_i' = g_{i-1}⋯g_1 u_i: each new reflection is applied at once to every later row.
    mapped = top_eigenvectors(covariance, count).to(torch.float64)
    built = torch.empty_like(mapped)
    for index in range(count):
        target = targets[index]
        # Choose the target's sign with u'ᵀh ≤ 0 so |v|² = 2 - 2u'ᵀh ≥ 2 (no cancellation).
        if mapped[index] @ target > 0:
            target = -target
        v = built[index]
        torch.sub(mapped[index], target, out=v)
        later = mapped[index + 1:]
        later -= torch.outer(later @ v, v * (2.0 / (v @ v)))
    return built.flip(0).to(covariance.dtype)


def normalize_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Rescale each nonzero vector to norm ``√d`` (entries of order 1); ``H(v)`` is unchanged.

    ``H(v)`` ignores ``|v|``, but the optimizer does not: with entries of order
    1, a step of ``lr`` moves a reflection by about ``lr`` whatever ``d`` is.
    """
    norms = vectors.norm(dim=1, keepdim=True)
    scale = torch.where(norms > 0, math.sqrt(vectors.shape[1]) / norms.clamp_min(torch.finfo(vectors.dtype).tiny),
                        torch.zeros_like(norms))
    return vectors * scale


def identity_pairs(num_reflections: int, dim: int, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(k, d)`` vectors whose product is exactly ``I`` yet trainable.

    Equal consecutive vectors cancel (``H(v)H(v) = I``) but, unlike zero
    vectors, receive gradients once one of a pair moves. An odd last one is zero.
    """
    vectors = torch.zeros(num_reflections, dim, dtype=dtype)
    pairs = num_reflections // 2
    if pairs:
        random = torch.randn(pairs, dim, generator=generator, dtype=torch.float64).to(dtype)
        vectors[: 2 * pairs] = random.repeat_interleave(2, dim=0)
    return vectors


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------
def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, without a call when it already is: a same-dtype ``.to`` still costs a
    dispatch, which shows when decoding runs a rotation or a kernel on one row at a time."""
    return x if x.dtype == dtype else x.to(dtype)


class Rotation(nn.Module):
    """The interface every rotation structure offers; fold, export and the loader use nothing else.

    ``R`` is a ``dim × dim`` orthogonal matrix acting on row vectors:
    ``rotate(x) = x R``, ``rotate_transposed(x) = x Rᵀ``, and
    ``rotate_weight(W) = W R`` for a weight ``(out, dim)`` read by rotated
    inputs, so ``(x R)(W R)ᵀ = x Wᵀ``. ``matrix()`` builds the dense ``R``
    (tests and small sizes only). ``spec()`` is the JSON description the
    loader rebuilds the structure from (``structured.rotation_from_spec``);
    the learned values themselves travel in ``state_dict()``.
    """

    structure: str = ""
    dim: int

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotate_transposed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W R`` for a weight ``(out, dim)``: its rows are rotated like inputs."""
        return self.rotate(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x)

    def matrix(self) -> torch.Tensor:
        """The dense ``R`` (``dim × dim``): ``I R``."""
        eye = torch.eye(self.dim, device=self._device())
        return self.rotate(eye)

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def build_inference_cache_(self, dtype: torch.dtype = torch.float32) -> "Rotation":
        """Build now, on the rotation's device, what its calls without gradients cache for inputs of
        ``dtype``; returns self. A loader calls this before the first forward: built lazily inside a
        long prefill, these small long-lived tensors land between its large temporaries and keep
        that memory resident. Structures without such a cache do nothing."""
        return self

    @torch.no_grad()
    def round_to_(self, dtype: torch.dtype) -> "Rotation":
        """Round every learned value to a ``dtype`` number (kept in its own dtype), in place; returns self.

        Every structure's learned part is Householder vectors, and a reflection
        is orthogonal for any vector, so the rounded ``R`` is still exactly
        orthogonal. Rounding before fold lets the export store the rotation in
        ``dtype`` while the folded weights match it exactly. Idempotent.
        """
        for child in self.children():
            if isinstance(child, Rotation):
                child.round_to_(dtype)
        return self

    @property
    def supports_pca(self) -> bool:
        return False

    def init_pca_(self, covariance: torch.Tensor, seed: int = 0) -> None:
        raise NotImplementedError(f"the {self.structure!r} rotation has no PCA init")

    def _device(self) -> torch.device:
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")


class HouseholderRotation(Rotation):
    """A learnable orthogonal ``R = H(v_k)⋯H(v_1)`` of size ``dim``.

    Args:
        dim: the rotated dimension ``d``.
        num_reflections: ``k`` (1 ≤ k ≤ d); ``k = d`` reaches every orthogonal matrix.
        init: ``identity`` (trainable pairs that cancel), ``random``,
            ``hadamard`` (a dense randomized Hadamard-like matrix; needs ``k = d``),
            or ``pca`` (identity until ``init_pca_`` is called with a covariance).
        seed: seeds ``random``/``hadamard``/``identity`` vectors.
        dense_apply_ratio: without gradients, apply ``R`` as its cached dense
            matrix when ``k ≥ ratio·d``, else as cached WY factors (speed only).

    With ``k = d`` this is the dense reference: ``d²`` parameters and ``n·d²``
    work per ``n`` rows. The structures in ``structured.py`` cost ``O(d)``.
    """

    structure = "householder"

    def __init__(self, dim: int, num_reflections: int, init: RotationInit = "identity",
                 seed: int = 0, dense_apply_ratio: float = DENSE_APPLY_RATIO) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim={dim} must be positive")
        if not 1 <= num_reflections <= dim:
            raise ValueError(f"num_reflections={num_reflections} must be in [1, dim={dim}]")
        if init not in ROTATION_INITS:
            raise ValueError(f"init={init!r} is not one of {ROTATION_INITS}")
        if init == "hadamard" and num_reflections != dim:
            raise ValueError(f"init='hadamard' needs num_reflections == dim ({dim}), got {num_reflections}")
        self.dim = dim
        self.num_reflections = num_reflections
        self.init = init
        self.dense_apply_ratio = dense_apply_ratio
        self.vectors = nn.Parameter(torch.zeros(num_reflections, dim))
        generator = torch.Generator().manual_seed(seed)
        # Built on the CPU from a CPU generator, also inside a device context (Lightning's
        # configure_model), so a seed gives the same rotation on every device.
        with torch.no_grad(), torch.device("cpu"):
            if init == "random":
                vectors = torch.randn(num_reflections, dim, generator=generator)
            elif init == "hadamard":
                vectors = reflections_from_orthogonal(hadamard_like(dim, generator))
            else:
                vectors = identity_pairs(num_reflections, dim, generator)
            self.vectors.copy_(normalize_vectors(vectors))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_reflections={self.num_reflections}, init={self.init}"

    def spec(self) -> dict[str, Any]:
        return {"structure": self.structure, "dim": self.dim, "reflections": self.num_reflections}

    @property
    def supports_pca(self) -> bool:
        return True

    @torch.no_grad()
    def init_pca_(self, covariance: torch.Tensor, seed: int = 0) -> None:
        """Fill the vectors from a ``(d, d)`` input covariance (docs/design.md §2.2).

        The first ``min(k, m)`` reflections flatten the top principal
        directions; the rest are identity pairs, so ``R`` is exactly the PCA map.
        """
        if covariance.shape != (self.dim, self.dim):
            raise ValueError(f"covariance shape {tuple(covariance.shape)} != ({self.dim}, {self.dim})")
        pca = pca_flat_reflections(covariance.float(), self.num_reflections)
        rest = identity_pairs(self.num_reflections - pca.shape[0], self.dim,
                              torch.Generator().manual_seed(seed))
        self.vectors.copy_(normalize_vectors(torch.cat([pca.to(self.vectors), rest.to(self.vectors)])))

    @torch.no_grad()
    def round_to_(self, dtype: torch.dtype) -> "HouseholderRotation":
        """Round the vectors to ``dtype`` numbers in place (see ``Rotation.round_to_``).

        A vector far from norm ``√d`` is first scaled by a power of two (exact,
        ``H(v)`` unchanged), so a narrow ``dtype`` neither overflows nor
        flushes it; vectors near ``√d`` are left as they are, keeping this idempotent.
        """
        vectors = self.vectors.detach()
        norms = vectors.norm(dim=1, keepdim=True)
        ratio = torch.where(norms > 0, math.sqrt(self.dim) / norms.clamp_min(torch.finfo(vectors.dtype).tiny),
                            torch.ones_like(norms))
        exponents = torch.round(torch.log2(ratio))
        exponents = torch.where(exponents.abs() > 4, exponents, torch.zeros_like(exponents))
        self.vectors.copy_((vectors * torch.exp2(exponents)).to(dtype).to(vectors.dtype))
        return self

    def _frozen(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...] | None:
        """What inference reuses across calls while no gradient is needed: ``(R,)`` or ``(Vᵀ, U⁻ᵀV, U⁻¹V)``.

        The vectors do not change at inference, so the Gram matrix and the
        triangular solve need not be redone per call. With ``k ≥ dense_apply_ratio·d`` the
        dense ``R`` is used (one GEMM, ``n·d²``); otherwise the solved WY factors
        turn a call into two thin GEMMs (``2ndk``): ``x R = x - (x Vᵀ)(U⁻ᵀ V)``.
        The cache is keyed on the parameter's version counter, which every
        in-place update (an optimizer step, ``load_state_dict``, an init) bumps.
        """
        if torch.is_grad_enabled():
            return None
        dtype = torch.promote_types(dtype, torch.float32)
        key = (self.vectors._version, self.vectors.data_ptr(), device, dtype)
        cached = getattr(self, "_frozen_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._frozen_factors(device, dtype))
            self._frozen_cache = cached
        return cached[1]

    def _frozen_factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``_frozen``'s value, computed in float32, then moved to ``device`` and ``dtype``."""
        vectors = self.vectors.detach().float()
        if self.num_reflections >= self.dense_apply_ratio * self.dim:
            value: tuple[torch.Tensor, ...] = (householder_matrix(vectors),)
        else:
            with autocast_off(vectors.device):
                factor = _triangular_factor(vectors)
                value = (vectors.T.contiguous(), torch.linalg.solve_triangular(factor.T, vectors, upper=False),
                         torch.linalg.solve_triangular(factor, vectors, upper=True))
        return tuple(t.to(device=device, dtype=dtype) for t in value)

    def build_inference_cache_(self, dtype: torch.dtype = torch.float32) -> "HouseholderRotation":
        with torch.no_grad():
            self._frozen(self._device(), dtype)
        return self

    def _apply_frozen(self, x: torch.Tensor, transpose: bool) -> torch.Tensor | None:
        frozen = self._frozen(x.device, x.dtype)
        if frozen is None:
            return None
        rows = as_dtype(x, frozen[0].dtype)
        with autocast_off(x.device):  # the same float32 arithmetic as the training path's
            if len(frozen) == 1:
                out = rows @ (frozen[0].T if transpose else frozen[0])
            else:
                vectors_t, solved, solved_t = frozen
                flat = rows.reshape(-1, rows.shape[-1])
                # One fused x - (x Vᵀ) Z: about half the time of a separate product and subtraction on CPU.
                out = torch.addmm(flat, flat @ vectors_t, solved_t if transpose else solved,
                                  alpha=-1).reshape(rows.shape)
        return as_dtype(out, x.dtype)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` for ``x`` of shape ``(..., d)``; also ``W ↦ W R`` for a weight."""
        out = self._apply_frozen(x, transpose=False)
        return householder_apply(x, self.vectors) if out is None else out

    def rotate_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x Rᵀ`` (the inverse rotation) for ``x`` of shape ``(..., d)``."""
        out = self._apply_frozen(x, transpose=True)
        return householder_apply(x, self.vectors, transpose=True) if out is None else out

    def matrix(self) -> torch.Tensor:
        """The dense ``R`` (``d × d``); reused across calls without gradients when the dense form is cached."""
        frozen = self._frozen(self.vectors.device, self.vectors.dtype)
        if frozen is not None and len(frozen) == 1:
            return frozen[0]
        return householder_matrix(self.vectors)
