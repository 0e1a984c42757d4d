"""A KV cache that holds K and V as packed low-bit codes, for blocks with a quantized KV cache.

A block with ``kv_bits < 16`` rounds K (after RoPE and the optional head-dim rotation) and V
per token and head. Fake quantization then stores the rounded values in floats, so the cache
is as large as an unquantized one. ``PackedKVLayer`` stores what the rounding produced: codes
two to a byte (bits ≤ 4; one a byte otherwise) and one ``scale`` and ``zero`` per token and
head in the activations' dtype. Each attention call reads the whole history back as
``(codes − zero) · scale``, the fake quantizer's own arithmetic, so the attention inputs, and
the logits, are those of the fake-quant cache bit for bit.

It is a transformers cache layer, so ``generate`` works unchanged: a block serving a packed
cache (``HHDecoderBlock.packed_kv_cache``) puts a ``PackedKVLayer`` in the slot of whatever
dynamic cache ``generate`` hands it (``packed_layer``), and ``PackedKVCache`` is a cache whose
layers are all packed from the start, for callers that build their own.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .quantizers import dequantize_codes

__all__ = ["PackedKVCache", "PackedKVLayer", "packed_layer"]

# Codes of at most this many bits are stored two to a byte.
NIBBLE_BITS = 4


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``(..., 2m)`` below 16 as ``(..., m)`` bytes: even positions in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: ``(..., m)`` bytes to uint8 codes ``(..., 2m)``."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


class PackedKVLayer(CacheLayerMixin):
    """One layer's K and V as packed codes with a scale and zero per token and head.

    ``update_codes(key, value)`` takes each as the ``(codes, scale, zero)`` of
    ``ActivationQuantizer.quantize`` on ``(batch, heads, new, head_dim)`` states, appends them and
    returns the whole history dequantized, ``(batch, heads, seen, head_dim)`` each.
    ``update`` (float states) is refused: the codes must come from the block's own quantizers.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("a PackedKVLayer stores codes: the block calls update_codes with its quantizers' output")

    def _append(self, name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bits: int) -> torch.Tensor:
        # quantize() gives (..., 1, head_dim) codes and (..., 1, 1) grids: one range per token and head.
        codes, scale, zero = codes.squeeze(-2), scale.squeeze(-2), zero.squeeze(-2)
        packs = bits <= NIBBLE_BITS and codes.shape[-1] % 2 == 0
        stored = pack_nibbles(codes) if packs else codes
        new = (stored, scale, zero)
        if name in self.parts:
            self.parts[name] = [torch.cat([old, part], dim=-2) for old, part in zip(self.parts[name], new)]
        else:
            self.parts[name] = list(new)
        stored, scale, zero = self.parts[name]
        return dequantize_codes(unpack_nibbles(stored) if packs else stored, scale, zero)

    def update_codes(self, key: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     value: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one step's K and V codes (``bits`` each); the whole K and V history, dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key[0], value[0])
        keys = self._append("keys", *key, bits)
        values = self._append("values", *value, bits)
        self.length = keys.shape[-2]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held: codes, scales and zeros of K and V."""
        return sum(part.numel() * part.element_size() for parts in self.parts.values() for part in parts)

    def reset(self) -> None:
        self.parts, self.length, self.is_initialized = {}, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative token count, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.parts:
            return
        keep = self.length + tokens_to_remove
        self.parts = {name: [part[..., :keep, :] for part in parts] for name, parts in self.parts.items()}
        self.length = keep

    def _select_batch(self, select) -> None:
        self.parts = {name: [select(part) for part in parts] for name, parts in self.parts.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda part: part.index_select(0, beam_idx.to(part.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda part: part.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda part: part[indices, ...])


class PackedKVCache(Cache):
    """A cache whose every layer is a ``PackedKVLayer`` (layers are added as the model reaches them)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=PackedKVLayer)

    def nbytes(self) -> int:
        """Bytes held over every layer."""
        return sum(layer.nbytes() for layer in self.layers)


def packed_layer(cache: Cache, layer_idx: int) -> PackedKVLayer:
    """The ``PackedKVLayer`` of ``cache``'s slot ``layer_idx``, put there in place of an empty dynamic layer.

    A ``ValueError`` where the slot already holds float K/V or is another kind of layer (a static
    or sliding-window cache): mixing the two would silently keep floats.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"a {type(cache).__name__} has no per-layer slots for a packed KV cache")
    while len(layers) <= layer_idx:
        layers.append(PackedKVLayer())
    layer = layers[layer_idx]
    if isinstance(layer, PackedKVLayer):
        return layer
    if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
        layers[layer_idx] = PackedKVLayer()
        return layers[layer_idx]
    raise ValueError(f"layer {layer_idx} of the {type(cache).__name__} is a {type(layer).__name__} holding "
                     f"{layer.get_seq_length()} tokens: a packed KV cache needs an empty dynamic cache")
