"""Packed-int4 kernels: the layout reproduces our grids exactly, and the kernel linear matches
the dequantizing one."""

import warnings

import pytest
import torch
from tiny_models import tiny_model

from hh_lightning.block import SIBLINGS, BlockQuantConfig, wrap_model
from hh_lightning.export import load_quantized, save_quantized
from hh_lightning.kernels import (
    FusedInt4Linear, Int4LayoutError, Int4Linear, Int8Embedding, Int8Linear, fuse_refusal, int4_layout, int8_rows,
    layout_codes, serve_weight_only_, use_int4_kernels_)
from hh_lightning.linear import FoldedLinear, HHLinear, InputTransform
from hh_lightning.quantizers import WeightQuantizer
from hh_lightning.weight_only import quantize_weights_hqq

SIZES = dict(hidden_size=128, intermediate_size=256)


def _relative_error(approx, exact):
    return float((approx - exact).norm() / exact.norm())


def _folded(grid: str, out_features=48, in_features=128, bits=4, seed=0) -> FoldedLinear:
    """A FoldedLinear with one of the project's grids: symmetric per-channel (W4A4), asymmetric
    grouped (minmax), HQQ's float zeros (weight_only)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    transform = InputTransform(in_features)
    if grid == "hqq":
        from hh_lightning.hqq import hqq_quantize
        from hh_lightning.weight_only import _fp16_grid

        solved = hqq_quantize(linear.weight.detach(), bits=bits, group_size=32, axis=1)
        codes, scale, zero = _fp16_grid(linear.weight.detach(), solved.scale, solved.zero, bits)
        assert not torch.equal(zero, zero.round())  # real-valued zeros
        return FoldedLinear(transform, bias=linear.bias.detach(), codes=codes, scale=scale, zero=zero, bits=bits)
    symmetric, group = {"symmetric_channel": (True, None), "asymmetric_grouped": (False, 32)}[grid]
    quantizer = WeightQuantizer(out_features, in_features, bits=bits, symmetric=symmetric, group_size=group)
    hh = HHLinear(linear, transform, quantizer)
    quantizer.initialize(hh.transformed_weight())
    return hh.fold()


GRIDS = ["symmetric_channel", "asymmetric_grouped", "hqq"]


@pytest.mark.parametrize("grid", GRIDS)
def test_layout_reproduces_codes_and_grid_bit_for_bit(grid) -> None:
    folded = _folded(grid)
    kernel = Int4Linear.from_folded(folded)
    assert torch.equal(layout_codes(kernel.layout), folded.codes)
    scale, zero = kernel.grid()
    assert torch.equal(scale, folded.scale) and torch.equal(zero, folded.zero)
    assert scale.dtype == folded.scale.dtype and zero.dtype == folded.zero.dtype
    assert torch.equal(kernel.dequantized_weight(), folded.dequantized_weight())
    back = kernel.to_folded()
    assert torch.equal(back.dequantized_weight(), folded.dequantized_weight())


def test_symmetric_per_channel_reaches_the_kernel_unrounded_in_bf16() -> None:
    folded = _folded("symmetric_channel", in_features=192)  # 192 = 3 kernel groups of 64
    layout = int4_layout(folded.codes, folded.scale, folded.zero, 4, torch.bfloat16)
    assert layout.group_size == 64 and layout.scale_and_zero.shape == (3, 48, 2)
    assert torch.all(layout.scale_and_zero[..., 0] == 1) and torch.all(layout.scale_and_zero[..., 1] == 0)
    assert torch.equal(layout.out_scale, folded.scale[:, 0])  # applied after the kernel, in float32
    # (q - 8)·s from the kernel's codes and the float32 output scale is FoldedLinear's weight exactly.
    kernel_weight = (layout_codes(layout).float() - 8) * layout.out_scale[:, None]
    assert torch.equal(kernel_weight, folded.dequantized_weight())


@pytest.mark.parametrize("grid", GRIDS)
def test_kernel_linear_matches_the_dequantizing_linear(grid) -> None:
    folded = _folded(grid)
    x = torch.randn(3, 5, folded.in_features)
    reference = folded(x)
    # float32 compute: (q - 8)·s + z in float32, a few ulp from (q - z)·s.
    exact = Int4Linear.from_folded(folded, torch.float32)(x)
    assert _relative_error(exact, reference) < 1e-5
    # bf16 compute (the fast CPU path): bf16 rounding of the activations and the output.
    fast = Int4Linear.from_folded(folded)(x)
    assert fast.dtype == x.dtype and fast.shape == reference.shape
    assert _relative_error(fast, reference) < 1e-2


@pytest.mark.parametrize("grid", GRIDS)
def test_bf16_kernel_error_is_bf16s_own_rounding(grid) -> None:
    """Against the exact product (float64), the bf16 kernel adds no more than bf16 itself forces:
    a per-channel grid (its scale applied after, in fp32) sits at the error of rounding the input
    and the output to bf16; a grouped grid adds its bf16 scales, about as much as dequantizing the
    weight to bf16 does. One bf16 rounding of the output is already above 1e-3."""
    folded = _folded(grid, out_features=96, in_features=256)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    weight, bias = folded.dequantized_weight().double(), folded.bias.double()

    def exact(inputs):
        return torch.nn.functional.linear(inputs.double(), weight, bias)

    reference = exact(x)
    output_rounding = _relative_error(reference.bfloat16().double(), reference)
    input_and_output_rounding = _relative_error(exact(x.bfloat16()).bfloat16().double(), reference)
    kernel = _relative_error(Int4Linear.from_folded(folded).forward_transformed(x).double(), reference)
    dequantizing_bf16 = _relative_error(folded.forward_transformed(x.bfloat16()).double(), reference)
    assert output_rounding > 1e-3
    if grid == "symmetric_channel":
        assert kernel <= 1.1 * input_and_output_rounding
    else:
        assert kernel <= 1.5 * input_and_output_rounding and kernel <= 1.25 * dequantizing_bf16


@pytest.mark.parametrize("bits, group, match", [(3, 32, "bits=3"), (8, 32, "bits=8"), (4, 16, "group_size=16")])
def test_grids_the_kernel_cannot_take_fall_back_with_a_warning(bits, group, match) -> None:
    model = quantize_weights_hqq(tiny_model("llama", **SIZES), bits=bits, group_size=group)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).logits
    with pytest.warns(UserWarning, match=match):
        report = use_int4_kernels_(model)
    assert not report.int4 and len(report.fallback) == 2 * 7
    assert all(match in reason for reason in report.fallback.values())
    assert all(isinstance(linear, FoldedLinear) for block in model.model.layers for linear in block.linears.values())
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference)
    with pytest.raises(Int4LayoutError, match="out_features=40"):
        int4_layout(torch.zeros(40, 64, dtype=torch.uint8), torch.ones(40, 1), torch.zeros(40, 1), 4)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_hqq_model_through_load_quantized_int4(model_type, tmp_path) -> None:
    model = quantize_weights_hqq(tiny_model(model_type, **SIZES), group_size=64)
    directory = save_quantized(model, tmp_path / "w4")
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    dense = load_quantized(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every grid here fits: no fallback
        fast = load_quantized(directory, kernels="int4")
    assert all(isinstance(linear, Int4Linear) for block in fast.model.layers for linear in block.linears.values())
    with torch.no_grad():
        reference, logits = dense(tokens).logits, fast(tokens).logits
    assert _relative_error(logits, reference) < 1e-2
    exact = load_quantized(directory)
    use_int4_kernels_(exact, torch.float32)
    with torch.no_grad():
        assert _relative_error(exact(tokens).logits, reference) < 1e-5
    generated = fast.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    with pytest.raises(ValueError, match="kernels='int8'"):
        load_quantized(directory, kernels="int8")


def test_loading_with_kernels_packs_exactly_what_packing_after_the_load_gives(tmp_path) -> None:
    """load_quantized(kernels='int4') packs layer by layer as it reads: the same buffers as packing
    a dense load afterwards."""
    model = quantize_weights_hqq(tiny_model("qwen2", **SIZES), group_size=64)
    directory = save_quantized(model, tmp_path / "w4")
    while_reading = load_quantized(directory, kernels="int4")
    after = load_quantized(directory)
    use_int4_kernels_(after)
    state, reference = while_reading.state_dict(), after.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[key], reference[key]) for key in reference)


def _folded_w4a4(model_type: str = "qwen2"):
    """A tiny W4A4KV4 model with the shipped rotation structure, folded (symmetric per-channel grids)."""
    model = tiny_model(model_type, **SIZES)
    quant = BlockQuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_init="minmax", rotation_structure="hadamard_householder",
                             rotation_init="random", qkv_reflections=8, upgate_reflections=8, down_reflections=8)
    wrap_model(model, quant)
    for block in model.model.layers:
        block.initialize_weight_quantizers()
        block.fold_()
    return model


def test_w4a4_served_as_w4a16_keeps_rotations_online() -> None:
    model = _folded_w4a4()
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w4a4 = model(tokens).logits
        serve_weight_only_(model)
        w4a16 = model(tokens).logits
        assert not torch.allclose(w4a4, w4a16)
        assert all(block.rotations() for block in model.model.layers)
        report = use_int4_kernels_(model, torch.float32)
        assert len(report.int4) == 2 * 7 and not report.fallback
        assert _relative_error(model(tokens).logits, w4a16) < 1e-5


@pytest.mark.parametrize("form", ["hqq qwen2", "hqq llama", "w4a4 qwen2"])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_fused_siblings_give_each_linears_own_output_exactly(form, compute_dtype) -> None:
    """q/k/v and gate/up as one kernel call: every output bit for bit what each linear gives alone
    (grouped HQQ grids with and without biases, per-channel W4A4 grids), and each sibling still
    computes alone through the views of the stacked buffers."""
    kind, model_type = form.split()
    model = (quantize_weights_hqq(tiny_model(model_type, **SIZES), group_size=64) if kind == "hqq"
             else _folded_w4a4(model_type))
    report = use_int4_kernels_(model, compute_dtype)
    assert len(report.fused) == len(SIBLINGS) * len(model.model.layers) and not report.fallback
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, SIZES["hidden_size"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused = model(tokens).logits
        for block in model.model.layers:
            for group, names in SIBLINGS.items():
                together = block.fused_linears[group].forward_transformed(x)
                assert len(together) == len(names)
                for name, output in zip(names, together):
                    assert torch.equal(output, block.linears[name].forward_transformed(x)), (group, name)
            block.fused_linears.clear()
        assert torch.equal(model(tokens).logits, fused)


def test_siblings_that_cannot_share_one_kernel_call_are_refused() -> None:
    first, second = (Int4Linear.from_folded(_folded("hqq", seed=seed)) for seed in (0, 1))
    assert "share one input transform" in fuse_refusal([first, second])
    with pytest.raises(ValueError, match="cannot fuse these linears: they do not share"):
        FusedInt4Linear([first, second])
    second.transform = first.transform
    assert fuse_refusal([first, second]) is None
    assert "fewer than two" in fuse_refusal([first])
    channel = Int4Linear.from_folded(_folded("symmetric_channel"))
    channel.transform = first.transform
    assert fuse_refusal([first, channel]) is not None  # another kernel group size, or an output scale
    unbiased = Int4Linear.from_folded(_folded("hqq", seed=2))
    unbiased.transform, unbiased.bias = first.transform, None
    assert "bias" in fuse_refusal([first, unbiased])


def test_int8_rows_are_within_half_a_step_of_the_weight() -> None:
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 2, 40)[:, None]
    weight[7] = 0.0
    codes, scale = int8_rows(weight)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127 and scale.shape == (40,)
    assert bool(((weight - codes.float() * scale[:, None]).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert scale[7] == 1 and not codes[7].any()


@pytest.mark.parametrize("compute_dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_int8_head_modules_match_their_dequantized_rows(compute_dtype, tolerance) -> None:
    generator = torch.Generator().manual_seed(4)
    codes, scale = int8_rows(torch.randn(300, 64, generator=generator))
    dequantized = codes.float() * scale[:, None]
    x = torch.randn(2, 5, 64, generator=generator)
    out = Int8Linear(codes, scale, compute_dtype)(x)
    assert out.shape == (2, 5, 300) and out.dtype == x.dtype
    assert _relative_error(out, x @ dequantized.T) < tolerance
    ids = torch.randint(0, 300, (3, 7), generator=generator)
    assert torch.equal(Int8Embedding(codes, scale)(ids), dequantized[ids])
    assert Int8Embedding(codes, scale, torch.bfloat16)(ids).dtype == torch.bfloat16


@pytest.mark.parametrize("model_type,tied", [("qwen2", True), ("llama", False)])
def test_load_quantized_with_an_int8_head(model_type, tied, tmp_path, monkeypatch) -> None:
    import hh_lightning.loading as loading

    model = quantize_weights_hqq(tiny_model(model_type, tie_word_embeddings=tied, **SIZES), group_size=64)
    directory = save_quantized(model, tmp_path / "w4")
    tokens = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(5))
    reference = load_quantized(directory)
    served = load_quantized(directory, kernels="int4", head="int8")
    embedding, head = served.get_input_embeddings(), served.get_output_embeddings()
    assert isinstance(embedding, Int8Embedding) and isinstance(head, Int8Linear)
    assert (embedding.codes is head.codes) == tied
    for module, original in ((embedding, reference.get_input_embeddings()), (head, reference.get_output_embeddings())):
        codes, scale = int8_rows(original.weight)
        assert torch.equal(module.codes, codes) and torch.equal(module.scale, scale)
    with torch.no_grad():
        assert _relative_error(served(tokens).logits, reference(tokens).logits) < 2e-2
    assert served.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
    monkeypatch.setattr(loading, "LOAD_CHUNK_BYTES", 1000)  # quantized in chunks of a few rows: the same codes
    chunked = load_quantized(directory, head="int8")
    assert torch.equal(chunked.get_input_embeddings().codes, embedding.codes)
    assert torch.equal(chunked.get_output_embeddings().scale, head.scale)
    with pytest.raises(ValueError, match="head='int4'"):
        load_quantized(directory, head="int4")
