"""A transformers decoder layer (Qwen2 or Llama) rebuilt with rotations and quantizers.

Where the rotations sit (docs/design.md §4), with ``x`` row vectors:

* ``qkv``: ``R_qkv`` (hidden size) online on the weightless-normalized input
  of q/k/v; the input norm's ``γ`` is folded into the three weights. One
  activation quantizer is shared by the three.
* ``o``: ``head`` mode: a head-dim ``R_o`` folded exactly into ``v_proj``
  (outputs) and ``o_proj`` (inputs), no online cost; ``full`` mode: a
  ``num_heads·head_dim`` rotation online on the input of ``o_proj``.
* ``upgate``: ``R_upgate`` (hidden size) shared by gate/up, post norm ``γ`` folded.
* ``down``: ``R_down`` (intermediate size) online on the input of ``down_proj``.
* ``kv``: optional head-dim rotation of Q and K after RoPE (the same one, so
  ``QKᵀ`` is unchanged) ahead of the per-head K/V quantizers.

With every quantizer off the block computes the transformers layer's function
for any rotations. RoPE comes from the model's own rotary module and the mask
from transformers' own ``create_causal_mask``; attention runs through
transformers' attention interface, so eager and sdpa both work.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from .gptq import gptq_codes
from .hqq import HQQSettings
from .kv_cache import packed_layer
from .linear import FoldedLinear, HHLinear, InputTransform, rotate_blocks, rotations_disabled
from .models import SUPPORTED_MODEL_TYPES, check_supported
from .quantizers import (
    WEIGHT_INITS,
    ActivationQuantizer,
    ClipSearch,
    WeightInit,
    WeightQuantizer,
)
from .rotation import ROTATION_INITS, Rotation, RotationInit
from .structured import (
    ROTATION_STRUCTURES,
    STRUCTURE_INITS,
    RotationStructure,
    make_rotation,
)

ORotationMode = Literal["head", "full", "none"]
RotationDtype = Literal["float16", "bfloat16", "float32"]
WeightRounding = Literal["nearest", "gptq"]
WEIGHT_ROUNDINGS: tuple[str, ...] = ("nearest", "gptq")
# Which collect_statistics entry holds each linear's (untransformed) input covariance.
LINEAR_INPUTS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o_proj", "gate_proj": "upgate",
                 "up_proj": "upgate", "down_proj": "down"}
ROTATION_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
PcaStatistics = Literal["raw", "token_relative"]
PCA_STATISTICS: tuple[str, ...] = ("raw", "token_relative")
# collect_statistics keeps a rotation input's per-token normalized sums under its name and this suffix.
TOKEN_RELATIVE_SUFFIX = ":token_relative"
# Five rotations per layer (j = 0..4), each seeding up to three parts (seed, seed + 1, seed + 2).
MIN_SEED_LAYER_STRIDE = 7
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The linears that read one shared input, in LINEAR_NAMES order.
SIBLINGS = {group: tuple(name for name in LINEAR_NAMES if LINEAR_INPUTS[name] == group) for group in ("qkv", "upgate")}

# Architecture differences the block needs, keyed by config.model_type. Both
# families share the layer layout; each keeps its own RoPE and eager attention.
ADAPTERS: dict[str, Any] = {
    "llama": modeling_llama,
    "qwen2": modeling_qwen2,
}
assert set(ADAPTERS) == set(SUPPORTED_MODEL_TYPES), "models.SUPPORTED_MODEL_TYPES and ADAPTERS disagree"
check_model_type = check_supported


@dataclass
class BlockQuantConfig:
    """Bits, granularity and rotations of one decoder block.

    Args:
        w_bits: weight bits (2..8; 16 = weights not quantized).
        w_symmetric: symmetric weight grid (zero at the middle code).
        w_group_size: weight group size along the input dimension (``None``: per output channel).
        w_learnable_clip: learn a clip ratio per output channel (or group).
        w_init: weight grid init: ``minmax``, ``search`` (clip search) or ``hqq``.
        a_bits: activation bits, per token, dynamic (2..16; 16 = off).
        a_symmetric: symmetric activation grid.
        a_learnable_clip: learn the activation clip ratio.
        a_clip_ratio_init: the activation clip ratio's start, in (0, 1] (also the K/V
            cache's, with ``kv_learnable_clip``).
        kv_bits: K/V cache bits, per head (2..16; 16 = off).
        kv_symmetric: symmetric K/V grid.
        kv_learnable_clip: learn a clip ratio for the K and for the V cache's
            per-token ranges (one scalar pair each, as FlatQuant's LAC for the KV cache).
        rotation_structure: how every rotation is built (docs/design.md §2.3):
            ``householder`` (k learned reflections; k = d is the dense
            reference, ``d²`` numbers per rotation), ``kronecker``
            (``diag(s)·(A ⊗ B)`` with full Householder factors, ``a² + b²``
            numbers) or ``hadamard_householder`` (a fixed randomized Hadamard,
            then k learned reflections, ``k·d`` numbers).
        qkv_reflections: reflections of ``R_qkv`` (0 = off, ``None`` = d).
        o_rotation: ``head`` (a head-dim ``R_o`` folded into v/o), ``full``
            (online on o_proj's input) or ``none``.
        o_reflections: reflections of ``R_o``.
        upgate_reflections: reflections of ``R_upgate``.
        down_reflections: reflections of ``R_down``.
        kv_reflections: reflections of the head-dim rotation of Q/K ahead of KV quantization.
        rotation_init: start of the learned part: ``identity``, ``random``,
            ``hadamard`` (householder: a dense randomized Hadamard, k = d;
            kronecker: Hadamard-like factors and random signs) or ``pca``
            (householder and hadamard_householder: top principal directions
            mapped onto flat ones).
        pca_statistics: which covariance the ``pca`` init diagonalizes: ``raw``, ``XᵀX/N`` of
            the rotation's input rows, or ``token_relative``, the same sum with each row
            scaled to unit mean square first. The per-token activation quantizer sees each
            token at its own scale, while the raw sum is dominated by the few tokens with
            massive activations; the token-relative one weighs every token alike, as
            ``optim.loss='token_relative'`` does. GPTQ's Hessians stay raw either way.
        rotation_dtype: the number format the learned rotation values are
            rounded to at fold and stored in (``float16``, ``bfloat16`` or
            ``float32``). Rounding happens before the weights are folded, so
            the fold stays exact and the rotation stays orthogonal; ``float16``
            halves the rotations' share of the export at no measurable cost.
        smoothing: learn per-channel smoothing scales folded into the weights.
        seed: base seed of the rotations.
        seed_layer_stride: layer ``i``'s rotation ``j`` is seeded ``seed + i·stride + j``, so
            a layer's rotations depend on its index alone (not on order or parallelism).
        w_rounding: how ``fold_`` picks the weight codes on the learned grid:
            ``nearest`` (round each weight alone) or ``gptq`` (round column by
            column, moving each rounding error onto the columns not yet rounded
            through the inverse Hessian of the linear's calibration inputs;
            ``gptq.py``). The grid and the packed format are the same.
        train_weights_quantized: fake-quantize the weights while training (default). ``false``
            trains the rotations and clips against activation (and K/V) quantization alone,
            weights unquantized, and sets the weight grids (``w_init``) at fold for the
            rotations kept: training then never sees nearest rounding, which ``gptq`` replaces
            (SpinQuant's choice with GPTQ). The weights' learnable clips are not trained.
        gptq_damp: ``gptq``'s damping, a fraction of the Hessian's mean diagonal (>= 0).
        gptq_act_order: ``gptq`` rounds the input channels in decreasing order of their
            Hessian diagonal (GPTQ's act-order) instead of in index order; each keeps its own
            group's grid, so the packed format is the same.
        w_search: the ``search`` weight init's grid (``quantizers.ClipSearch``).
        w_hqq: the ``hqq`` weight init's solver settings (``hqq.HQQSettings``).
        dense_apply_ratio: at inference, a Householder product with ``k ≥ ratio·d``
            reflections is applied as its dense ``d × d`` matrix (one GEMM, ``n·d²``)
            instead of the WY form (two thin GEMMs, ``2·n·d·k``); 0.5 is where their
            multiply-adds are equal. Changes speed, not results.

    Reflection counts matter for ``householder`` and ``hadamard_householder``;
    for ``kronecker`` only 0 (off) is read. ``householder`` with
    ``rotation_init='hadamard'`` always uses the full dimension.

    The defaults are the structure that measured best on SmolLM2 (README,
    *Rotation structures*): a fixed randomized Hadamard, then 32
    PCA-initialized reflections per online rotation.
    """

    w_bits: int = 4
    w_symmetric: bool = True
    w_group_size: int | None = None
    w_learnable_clip: bool = True
    w_init: WeightInit = "search"
    a_bits: int = 4
    a_symmetric: bool = False
    a_learnable_clip: bool = True
    a_clip_ratio_init: float = 0.98
    kv_bits: int = 16
    kv_symmetric: bool = False
    kv_learnable_clip: bool = False
    rotation_structure: RotationStructure = "hadamard_householder"
    qkv_reflections: int | None = 32
    o_rotation: ORotationMode = "head"
    o_reflections: int | None = None
    upgate_reflections: int | None = 32
    down_reflections: int | None = 32
    kv_reflections: int | None = 0
    rotation_init: RotationInit = "pca"
    pca_statistics: PcaStatistics = "raw"
    rotation_dtype: RotationDtype = "float16"
    smoothing: bool = False
    seed: int = 0
    seed_layer_stride: int = 1000
    w_rounding: WeightRounding = "nearest"
    train_weights_quantized: bool = True
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    w_search: ClipSearch = field(default_factory=ClipSearch)
    w_hqq: HQQSettings = field(default_factory=HQQSettings)
    dense_apply_ratio: float = 0.5

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BlockQuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown quantization field(s) {unknown}; known: {sorted(known)}")
        nested = {"w_search": ClipSearch, "w_hqq": HQQSettings}
        return cls(**{k: nested[k](**v) if k in nested and isinstance(v, dict) else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rotation_dims(self, config: PretrainedConfig) -> dict[str, int]:
        """Dimension of each enabled rotation for a model ``config``."""
        head_dim = head_dim_of(config)
        dims = {"qkv": config.hidden_size, "upgate": config.hidden_size, "down": config.intermediate_size,
                "kv": head_dim}
        if self.o_rotation == "head":
            dims["o"] = head_dim
        elif self.o_rotation == "full":
            dims["o"] = config.num_attention_heads * head_dim
        return dims

    def reflections(self, name: str, dim: int) -> int:
        """Reflection count of rotation ``name`` of size ``dim`` (0 = off)."""
        count = getattr(self, f"{name}_reflections")
        if count == 0:
            return 0
        if self.rotation_structure == "kronecker" or (self.rotation_structure == "householder"
                                                      and self.rotation_init == "hadamard"):
            return dim
        return dim if count is None else count

    def validate(self, config: PretrainedConfig) -> None:
        """Check every setting against the model before any heavy work; one-line errors."""
        check_model_type(config)
        if self.rotation_init not in ROTATION_INITS:
            raise ValueError(f"quant.rotation_init={self.rotation_init!r} is not one of {ROTATION_INITS}")
        if self.rotation_structure not in ROTATION_STRUCTURES:
            raise ValueError(f"quant.rotation_structure={self.rotation_structure!r} is not one of "
                             f"{ROTATION_STRUCTURES}")
        allowed = STRUCTURE_INITS[self.rotation_structure]
        if self.rotation_init not in allowed:
            raise ValueError(f"quant.rotation_init={self.rotation_init!r} is not available with "
                             f"quant.rotation_structure={self.rotation_structure!r}; choose one of {allowed}")
        if self.w_init not in WEIGHT_INITS:
            raise ValueError(f"quant.w_init={self.w_init!r} is not one of {WEIGHT_INITS}")
        if not 0 < self.a_clip_ratio_init <= 1:
            raise ValueError(f"quant.a_clip_ratio_init={self.a_clip_ratio_init} must be in (0, 1]")
        if self.seed < 0:
            raise ValueError(f"quant.seed={self.seed} must be >= 0")
        if self.seed_layer_stride < MIN_SEED_LAYER_STRIDE:
            raise ValueError(f"quant.seed_layer_stride={self.seed_layer_stride} must be >= {MIN_SEED_LAYER_STRIDE}, "
                             "or two layers' rotations would share seeds")
        if self.w_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"quant.w_rounding={self.w_rounding!r} is not one of {WEIGHT_ROUNDINGS}")
        if not self.gptq_damp >= 0.0:
            raise ValueError(f"quant.gptq_damp={self.gptq_damp} must be >= 0")
        if not 0.0 <= self.dense_apply_ratio <= 1.0:
            raise ValueError(f"quant.dense_apply_ratio={self.dense_apply_ratio} must be in [0, 1]")
        self.w_search.validate("quant.w_search")
        self.w_hqq.validate("quant.w_hqq")
        if self.pca_statistics not in PCA_STATISTICS:
            raise ValueError(f"quant.pca_statistics={self.pca_statistics!r} is not one of {PCA_STATISTICS}")
        if self.rotation_dtype not in ROTATION_DTYPES:
            raise ValueError(f"quant.rotation_dtype={self.rotation_dtype!r} is not one of {ROTATION_DTYPES}")
        if self.o_rotation not in ("head", "full", "none"):
            raise ValueError(f"quant.o_rotation={self.o_rotation!r} is not one of ('head', 'full', 'none')")
        for name, dim in self.rotation_dims(config).items():
            count = getattr(self, f"{name}_reflections")
            if count is not None and not 0 <= count <= dim:
                raise ValueError(f"quant.{name}_reflections={count} must be in [0, {dim}] "
                                 f"(the {name} rotation's dimension)")
        in_features = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                       "num_attention_heads*head_dim": config.num_attention_heads * head_dim_of(config)}
        if self.w_group_size is not None:
            for label, size in in_features.items():
                if self.w_group_size < 1 or size % self.w_group_size:
                    raise ValueError(f"quant.w_group_size={self.w_group_size} does not divide {label}={size}")
        # Building throwaway quantizers reuses their own range checks, prefixed with the field.
        for field_name, build in (
                ("w_bits", lambda: WeightQuantizer(1, self.w_group_size or 1, bits=self.w_bits,
                                                   group_size=self.w_group_size)),
                ("a_bits", lambda: ActivationQuantizer(bits=self.a_bits)),
                ("kv_bits", lambda: ActivationQuantizer(bits=self.kv_bits))):
            try:
                build()
            except ValueError as error:
                raise ValueError(f"quant.{field_name}={getattr(self, field_name)}: {error}") from None


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _scaled_linear(linear: nn.Linear, gamma: torch.Tensor | None) -> nn.Linear:
    """A copy of ``linear`` reading ``x`` instead of ``x · diag(γ)`` (``W ↦ W diag(γ)``)."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight if gamma is None else linear.weight * gamma)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def _weightless_norm(norm: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """Copy of an RMSNorm with ``γ = 1`` (frozen), and the original ``γ``."""
    gamma = norm.weight.detach().clone()
    weightless = copy.deepcopy(norm)
    with torch.no_grad():
        weightless.weight.fill_(1.0)
    weightless.weight.requires_grad_(False)
    return weightless, gamma


def _attention_shell(attention: nn.Module) -> nn.Module:
    """The attention module's attributes (config, heads, scaling, …) without its linears.

    transformers' attention functions read those attributes from the module
    they are given; the weights live in the block's own linears.
    """
    shell = copy.copy(attention)
    shell._modules = {}
    shell._parameters = {}
    shell._buffers = {}
    return shell


class HHDecoderBlock(nn.Module):
    """One decoder layer with Householder rotations and fake quantizers.

    Args:
        layer: the transformers decoder layer (left untouched; weights are copied).
        config: the model's config.
        rotary_emb: the model's rotary embedding module (copied, so the block
            runs standalone on hidden states and position ids).
        quant: the block's quantization settings.
        layer_idx: the layer's index (KV cache slot, and the rotations' seeds).
        own_device: where the tensors the block creates (rotations, clips, fixed factors) go; default
            the layer's device. Copied weights stay where the layer's are (meta, for the loaders).
    """

    def __init__(self, layer: nn.Module, config: PretrainedConfig, rotary_emb: nn.Module,
                 quant: BlockQuantConfig, layer_idx: int, own_device: str | torch.device | None = None) -> None:
        super().__init__()
        quant.validate(config)
        self.config = config
        self.quant = quant
        self.layer_idx = layer_idx
        self.head_dim = head_dim_of(config)
        self.attention = _attention_shell(layer.self_attn)
        self.rotary_emb = copy.deepcopy(rotary_emb)
        self.act_fn = layer.mlp.act_fn
        self.input_norm, input_gamma = _weightless_norm(layer.input_layernorm)
        self.post_attention_norm, post_gamma = _weightless_norm(layer.post_attention_layernorm)
        # Kept (not saved) so a weight-only quantizer can undo the fold: see weight_only.py.
        self.register_buffer("input_gamma", input_gamma, persistent=False)
        self.register_buffer("post_attention_gamma", post_gamma, persistent=False)

        dims = quant.rotation_dims(config)
        rotations = {name: self._make_rotation(name, dim, index) for index, (name, dim) in enumerate(dims.items())}
        self.o_rotation = rotations.get("o") if quant.o_rotation == "head" else None
        self.kv_rotation = rotations.get("kv")
        qkv = self._make_transform(config.hidden_size, rotations.get("qkv"))
        upgate = self._make_transform(config.hidden_size, rotations.get("upgate"))
        o_online = rotations.get("o") if quant.o_rotation == "full" else None
        o_input = self._make_transform(config.num_attention_heads * self.head_dim, o_online, smoothing=False)
        down = self._make_transform(config.intermediate_size, rotations.get("down"))

        attn, mlp = layer.self_attn, layer.mlp
        self.linears = nn.ModuleDict({
            "q_proj": self._wrap(_scaled_linear(attn.q_proj, input_gamma), qkv),
            "k_proj": self._wrap(_scaled_linear(attn.k_proj, input_gamma), qkv),
            "v_proj": self._wrap(_scaled_linear(attn.v_proj, input_gamma), qkv, output_rotation=self.o_rotation),
            "o_proj": self._wrap(attn.o_proj, o_input, prerotated_input=self.o_rotation),
            "gate_proj": self._wrap(_scaled_linear(mlp.gate_proj, post_gamma), upgate),
            "up_proj": self._wrap(_scaled_linear(mlp.up_proj, post_gamma), upgate),
            "down_proj": self._wrap(mlp.down_proj, down),
        })
        self.k_quantizer, self.v_quantizer = (
            ActivationQuantizer(bits=quant.kv_bits, symmetric=quant.kv_symmetric,
                                learnable_clip=quant.kv_learnable_clip, clip_ratio_init=quant.a_clip_ratio_init)
            for _ in range(2))
        # Sibling linears served as one kernel call (kernels.use_int4_kernels_, integer.use_integer_kernels_);
        # empty otherwise.
        self.fused_linears = nn.ModuleDict()
        # K/V stored as packed codes in the KV cache (integer.use_integer_kernels_ sets it for a quantized cache).
        self.packed_kv_cache = False
        self._statistics: dict[str, list[torch.Tensor]] | None = None
        self.rotation_bypass = False  # set by rotations_disabled(); not a setting
        # Rotations, smoothing and quantizer parameters are created on the CPU; join the layer's device,
        # or own_device: loading.load_quantized wraps a meta layer (copied weights are placeholders it
        # replaces) and keeps what the block builds itself on the CPU.
        if own_device is None:
            self.to(attn.q_proj.weight.device)
        else:
            self._apply(lambda tensor: tensor if tensor.device.type == "meta" else tensor.to(own_device))

    # ---------------------------------------------------------------- building
    def _make_rotation(self, name: str, dim: int, index: int) -> Rotation | None:
        count = self.quant.reflections(name, dim)
        if count == 0:
            return None
        # The seed depends only on the layer, so layer order and parallelism don't change results.
        seed = self.quant.seed + self.quant.seed_layer_stride * self.layer_idx + index
        return make_rotation(self.quant.rotation_structure, dim, count, self.quant.rotation_init, seed,
                             dense_apply_ratio=self.quant.dense_apply_ratio)

    def _make_transform(self, dim: int, rotation: Rotation | None,
                        smoothing: bool | None = None) -> InputTransform:
        quant = self.quant
        act = ActivationQuantizer(bits=quant.a_bits, symmetric=quant.a_symmetric,
                                  learnable_clip=quant.a_learnable_clip, clip_ratio_init=quant.a_clip_ratio_init)
        return InputTransform(dim, rotation, act, smoothing=quant.smoothing if smoothing is None else smoothing)

    def _wrap(self, linear: nn.Linear, transform: InputTransform, **rotations: Any) -> HHLinear:
        quant = self.quant
        weight_quantizer = WeightQuantizer(linear.out_features, linear.in_features, bits=quant.w_bits,
                                           symmetric=quant.w_symmetric, group_size=quant.w_group_size,
                                           learnable_clip=quant.w_learnable_clip)
        return HHLinear(linear, transform, weight_quantizer, **rotations)

    # --------------------------------------------------------------- accessors
    def rotations(self) -> dict[str, Rotation]:
        """The enabled rotations by name: ``qkv``, ``o``, ``upgate``, ``down``, ``kv``."""
        found = {
            "qkv": self.linears["q_proj"].transform.rotation,
            "o": self.o_rotation if self.o_rotation is not None else self.linears["o_proj"].transform.rotation,
            "upgate": self.linears["gate_proj"].transform.rotation,
            "down": self.linears["down_proj"].transform.rotation,
            "kv": self.kv_rotation,
        }
        return {name: rotation for name, rotation in found.items() if rotation is not None}

    def online_rotations(self) -> dict[str, Rotation]:
        """The rotations applied to activations at run time: ``rotations()`` less a head-dim ``o``
        one, which lives in the weights of v_proj and o_proj (``o_rotation='head'``)."""
        return {name: rotation for name, rotation in self.rotations().items()
                if not (name == "o" and self.o_rotation is not None)}

    def source_state_names(self) -> list[str]:
        """State-dict names of the tensors copied from the full-precision layer: the linears' weights and
        biases and the norms' (γ = 1) weights. They never train, and building the block from the same
        layer gives them again, so a training checkpoint can leave them out (``HHBlockModule``)."""
        names = ["input_norm.weight", "post_attention_norm.weight"]
        for name, linear in self.linears.items():
            if isinstance(linear, HHLinear):
                names += [f"linears.{name}.{part}" for part in ("weight", "bias") if getattr(linear, part) is not None]
        return names

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into ``transforms`` (reflections), ``smoothing`` (the per-channel
        log-scales) and ``clips`` (weight and activation clip logits); a group may be empty."""
        groups: dict[str, list[nn.Parameter]] = {"transforms": [], "smoothing": [], "clips": []}
        seen: set[int] = set()
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            group = "clips" if "clip_logit" in name else "smoothing" if "log_smoothing" in name else "transforms"
            groups[group].append(parameter)
        return groups

    @property
    def is_folded(self) -> bool:
        return all(isinstance(linear, FoldedLinear) for linear in self.linears.values())

    # ------------------------------------------------------------------- math
    def _record(self, name: str, rows: torch.Tensor) -> None:
        if self._statistics is None:
            return
        rows = rows.detach().reshape(-1, rows.shape[-1]).float()
        self._accumulate(name, rows)
        if self.quant.pca_statistics == "token_relative" and name in self.rotations():
            mean_square = rows.pow(2).mean(dim=1, keepdim=True)
            # An all-zero row (nothing to normalize) stays zero rather than dividing by zero.
            scale = torch.where(mean_square > 0, mean_square.clamp_min(torch.finfo(rows.dtype).tiny).rsqrt(),
                                torch.zeros_like(mean_square))
            self._accumulate(name + TOKEN_RELATIVE_SUFFIX, rows * scale)

    def _accumulate(self, key: str, rows: torch.Tensor) -> None:
        """Add ``rowsᵀ rows`` (float64, on the CPU) and the row count to ``self._statistics[key]``."""
        gram = (rows.T @ rows).double().cpu()
        entry = self._statistics.get(key)
        if entry is None:  # the first batch's sums are the product itself: no d × d zeros to fill and add to
            self._statistics[key] = [gram, torch.tensor(float(rows.shape[0]), dtype=torch.float64)]
        else:
            entry[0] += gram
            entry[1] += rows.shape[0]

    def _sibling_outputs(self, group: str, x_transformed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of the linears that read input ``group`` (``qkv``, ``upgate``), in
        ``LINEAR_NAMES`` order, from their shared transformed input: one kernel call where
        ``kernels.use_int4_kernels_`` fused them into ``fused_linears[group]``."""
        if group in self.fused_linears:
            return self.fused_linears[group].forward_transformed(x_transformed)
        return tuple(self.linears[name].forward_transformed(x_transformed) for name in SIBLINGS[group])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Any = None,
                use_cache: bool | None = False, cache: Any = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> torch.Tensor:
        """``hidden_states``: ``(batch, seq, hidden)``; returns the same shape.

        Standalone, pass only ``hidden_states`` (and ``position_ids``); RoPE
        and the causal mask are then computed here. Inside a model, the
        model's own mask, position embeddings and cache are used.
        """
        batch, length, _ = hidden_states.shape
        # transformers ≥ 5.x hands the KV cache over as ``cache``; older versions as ``past_key_values``.
        # Ignoring either silently drops the cache: decoding then attends to the new token alone.
        past_key_values = cache if cache is not None else past_key_values
        if position_embeddings is None:  # standalone: the model did not prepare RoPE and the mask
            if position_ids is None:
                offset = past_key_values.get_seq_length() if past_key_values is not None else 0
                position_ids = torch.arange(offset, offset + length, device=hidden_states.device)[None]
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
            if attention_mask is None:
                attention_mask = create_causal_mask(
                    config=self.config, inputs_embeds=hidden_states, attention_mask=None,
                    past_key_values=past_key_values, position_ids=position_ids)
        linears = self.linears
        model_functions = ADAPTERS[self.config.model_type]

        residual = hidden_states
        normed = self.input_norm(hidden_states)
        self._record("qkv", normed)
        qkv_input = linears["q_proj"].transform(normed)
        heads = (batch, length, -1, self.head_dim)
        query, key, value = [output.view(heads).transpose(1, 2) for output in self._sibling_outputs("qkv", qkv_input)]
        cos, sin = position_embeddings
        query, key = model_functions.apply_rotary_pos_emb(query, key, cos, sin)
        self._record("kv", key)
        if self.kv_rotation is not None and not self.rotation_bypass:
            query, key = self.kv_rotation.rotate(query), self.kv_rotation.rotate(key)
        if self.packed_kv_cache and past_key_values is not None:
            # The cache keeps the codes themselves (kv_cache.py); what attention reads back is the
            # fake quantizers' output bit for bit.
            key, value = packed_layer(past_key_values, self.layer_idx).update_codes(
                self.k_quantizer.quantize(key), self.v_quantizer.quantize(value), self.k_quantizer.bits)
        else:
            key, value = self.k_quantizer(key), self.v_quantizer(value)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
        attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, model_functions.eager_attention_forward)
        attended, _ = attention_function(
            self.attention, query, key, value, attention_mask, dropout=0.0, scaling=self.attention.scaling,
            sliding_window=getattr(self.attention, "sliding_window", None), **kwargs)
        attended = attended.reshape(batch, length, -1)
        if self._statistics is not None:
            unrotated = (attended if self.o_rotation is None or self.rotation_bypass
                         else rotate_blocks(attended, self.o_rotation, True))
            self._record("o", unrotated.reshape(batch, length, -1, self.head_dim) if self.o_rotation is not None
                         else unrotated)
            self._record("o_proj", unrotated)  # o_proj's whole input, unrotated, for its GPTQ Hessian
        hidden_states = residual + linears["o_proj"](attended)

        residual = hidden_states
        normed = self.post_attention_norm(hidden_states)
        self._record("upgate", normed)
        gate, up = self._sibling_outputs("upgate", linears["gate_proj"].transform(normed))
        intermediate = self.act_fn(gate) * up
        self._record("down", intermediate)
        if self._statistics is not None:
            return residual  # collect_statistics keeps only the records: down_proj's output feeds none of them
        return residual + linears["down_proj"](intermediate)

    # ------------------------------------------------------- initialization
    @torch.no_grad()
    def collect_statistics(self, hidden_states: torch.Tensor,
                           statistics: dict[str, list[torch.Tensor]] | None = None,
                           position_ids: torch.LongTensor | None = None) -> dict[str, list[torch.Tensor]]:
        """Accumulate ``XᵀX`` (float64) and row counts of every rotation's input.

        Run as the full-precision layer: quantizers and rotations bypassed
        (``rotations_disabled``), so the sums are the same, bit for bit,
        whatever the rotations hold: those taken for the PCA init serve the
        GPTQ fold of the trained block.
        """
        from .quantizers import quantization_disabled

        self._statistics = {} if statistics is None else statistics
        try:
            with quantization_disabled(self), rotations_disabled(self):
                self(hidden_states, position_ids=position_ids)
            return self._statistics
        finally:
            self._statistics = None

    @torch.no_grad()
    def init_rotations_pca_(self, statistics: dict[str, list[torch.Tensor]]) -> None:
        """PCA-initialize every rotation from ``collect_statistics`` sums (``quant.pca_statistics``'s)."""
        suffix = TOKEN_RELATIVE_SUFFIX if self.quant.pca_statistics == "token_relative" else ""
        for name, rotation in self.rotations().items():
            if rotation.supports_pca:
                total, count = statistics[name + suffix]
                rotation.init_pca_((total / count).to(rotation._device()), seed=self.quant.seed + self.layer_idx)

    @torch.no_grad()
    def initialize_weight_quantizers(self, method: WeightInit | None = None) -> None:
        """Set each weight quantizer's clip ratios for its current rotated weight."""
        for linear in self.linears.values():
            if isinstance(linear, HHLinear) and linear.weight_quantizer.enabled:
                linear.weight_quantizer.initialize(linear.transformed_weight(), method or self.quant.w_init,
                                                   search=self.quant.w_search, hqq=self.quant.w_hqq)

    @torch.no_grad()
    def round_rotations_(self) -> "HHDecoderBlock":
        """Round every rotation's learned values to ``quant.rotation_dtype`` (in place); returns self.

        ``fold_`` does this first. Call it before measuring an unfolded block
        that the folded one must match exactly. Idempotent.
        """
        dtype = getattr(torch, self.quant.rotation_dtype)
        for rotation in self.rotations().values():
            rotation.round_to_(dtype)
        return self

    @torch.no_grad()
    def fold_(self, statistics: dict[str, list[torch.Tensor]] | None = None, *,
              codes_from_file: bool = False) -> "HHDecoderBlock":
        """Round the rotations (``round_rotations_``), then replace every linear by its deployable
        ``FoldedLinear`` (in place); returns self.

        With ``quant.w_rounding='gptq'`` each linear's codes are GPTQ-rounded
        against the input Hessian in ``statistics`` (``collect_statistics``
        over calibration inputs, taken after ``round_rotations_``).
        ``codes_from_file``: the codes are about to be replaced by saved
        ones (the loaders): each linear becomes ``HHLinear.fold_placeholder()``, shapes only, with
        nothing computed.
        """
        gptq = self.quant.w_rounding == "gptq" and not codes_from_file
        if gptq and statistics is None:
            raise ValueError("quant.w_rounding='gptq' folds with the inputs' statistics: "
                             "block.fold_(block.collect_statistics(calibration_inputs))")
        if not any(isinstance(linear, FoldedLinear) for linear in self.linears.values()):
            self.round_rotations_()  # never under weights already folded with the unrounded values
        codes, weights = self._gptq_codes(statistics) if gptq else ({}, {})
        for name in LINEAR_NAMES:
            linear = self.linears[name]
            if isinstance(linear, HHLinear):
                self.linears[name] = (linear.fold_placeholder() if codes_from_file
                                      else linear.fold(codes=codes.get(name), transformed_weight=weights.get(name)))
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self


    @torch.no_grad()
    def _gptq_codes(self, statistics: dict[str, list[torch.Tensor]]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """GPTQ codes of every quantized linear, by name, from ``collect_statistics`` sums, and the
        ``W̃`` each was rounded from (so the fold need not compute it again).

        Linears that read the same input (q/k/v, gate/up: one transform, no pre-rotated input) have
        the same Hessian, and GPTQ never mixes rows, so their stacked rows are rounded in one pass:
        the codes of separate passes, at a fraction of the per-column loop's cost.
        """
        groups: dict[tuple[str, int, int], list[str]] = {}
        for name in LINEAR_NAMES:
            linear = self.linears[name]
            if isinstance(linear, HHLinear) and linear.weight_quantizer.enabled:
                key = (LINEAR_INPUTS[name], id(linear.transform), id(linear.prerotated_input))
                groups.setdefault(key, []).append(name)
        codes: dict[str, torch.Tensor] = {}
        transformed: dict[str, torch.Tensor] = {}
        for (entry, _, _), names in groups.items():
            linears = [self.linears[name] for name in names]
            weights = [linear.transformed_weight().float() for linear in linears]
            transformed.update(zip(names, weights))
            grids = [linear.weight_quantizer.quantize(weight) for linear, weight in zip(linears, weights)]
            stacked = gptq_codes(torch.cat(weights), linears[0].transformed_hessian(statistics[entry][0]),
                                 torch.cat([grid[1] for grid in grids]), torch.cat([grid[2] for grid in grids]),
                                 linears[0].weight_quantizer.bits, damp=self.quant.gptq_damp,
                                 act_order=self.quant.gptq_act_order)
            for name, part in zip(names, stacked.split([weight.shape[0] for weight in weights])):
                codes[name] = part.clone()
        return codes, transformed


def named_blocks(model: nn.Module, prefix: str = "") -> list[tuple[str, HHDecoderBlock]]:
    """``(name, block)`` of every ``HHDecoderBlock`` in ``model`` (``model`` itself when it is one), each
    name prefixed by ``prefix``; a ``ValueError`` naming ``model``'s type when it holds none."""
    blocks = [(".".join(filter(None, (prefix, name))), module) for name, module in model.named_modules()
              if isinstance(module, HHDecoderBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no HHDecoderBlock: load or fold a quantized model first")
    return blocks


def wrap_model(model: nn.Module, quant: BlockQuantConfig, layer_indices: list[int] | None = None, *,
               own_device: str | torch.device | None = None) -> nn.Module:
    """Replace decoder layers of a causal LM (in place) by ``HHDecoderBlock``s (``own_device`` as
    theirs); returns the model."""
    quant.validate(model.config)
    layers = model.model.layers
    for index in range(len(layers)) if layer_indices is None else layer_indices:
        layers[index] = HHDecoderBlock(layers[index], model.config, model.model.rotary_emb, quant, index,
                                       own_device=own_device)
    return model
