"""Integer execution: activation codes times weight codes equal the fake-quant linears and model."""

import warnings

import pytest
import torch
from test_export import STRUCTURE_INIT, _w4a4_model
from tiny_models import tiny_model

from hh_lightning.block import LINEAR_NAMES, BlockQuantConfig, wrap_model
from hh_lightning.export import load_quantized, save_quantized
from hh_lightning.integer import (
    IntegerInputTransform, IntegerKernelConfig, IntegerLinear, integer_refusal, resolve_backend,
    use_integer_kernels_)
from hh_lightning.kv_cache import PackedKVLayer
from hh_lightning.linear import FoldedLinear, InputTransform
from hh_lightning.quantizers import ActivationQuantizer, WeightQuantizer

# Every GEMM backend this machine can run (onednn needs a CPU torch built with it).
RUNNABLE_BACKENDS = sorted({resolve_backend("auto", torch.device("cpu")), "int_mm"})
# Relative output error of the integer linear against the fake-quant one: float32 rounding only.
FLOAT_ROUNDING = 2e-6
# Exactness checks keep decoding rows on the integer path too (the int4 kernel computes in bf16).
EVERY_ROW_INTEGER = IntegerKernelConfig(int4_rows_max=0)


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).detach().norm() / exact.detach().norm())


def _folded(transform: InputTransform, out_features: int, *, w_bits: int, w_symmetric: bool,
            group_size: int | None, bias: bool, seed: int) -> FoldedLinear:
    """A FoldedLinear on a min-max grid of ``w_bits`` reading ``transform``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, transform.dim, generator=generator)
    quantizer = WeightQuantizer(out_features, transform.dim, bits=w_bits, symmetric=w_symmetric,
                                group_size=group_size)
    codes, scale, zero = quantizer.quantize(weight)
    return FoldedLinear(transform, bias=torch.randn(out_features, generator=generator) if bias else None,
                        codes=codes, scale=scale, zero=zero, bits=w_bits)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
@pytest.mark.parametrize("a_bits,a_symmetric", [(4, False), (4, True), (8, False), (2, True)])
@pytest.mark.parametrize("w_bits,w_symmetric", [(4, True), (4, False), (8, True), (3, False)])
@pytest.mark.parametrize("group_size", [None, 16, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_integer_linear_equals_the_fake_quant_linear(backend, a_bits, a_symmetric, w_bits, w_symmetric,
                                                     group_size, bias) -> None:
    dim = 64
    quantizer = ActivationQuantizer(bits=a_bits, symmetric=a_symmetric, learnable_clip=True, clip_ratio_init=0.9)
    transform = InputTransform(dim, None, quantizer)
    # Siblings of different widths, as q/k/v: one GEMM on their stacked rows.
    folded = [_folded(transform, width, w_bits=w_bits, w_symmetric=w_symmetric, group_size=group_size,
                      bias=bias, seed=index) for index, width in enumerate((40, 24))]
    x = torch.randn(3, 7, dim) * 3 + 0.5  # off-centre, so asymmetric zeros are far from the midpoint
    stacked = IntegerLinear(IntegerInputTransform(transform), folded, IntegerKernelConfig(backend=backend, int4_rows_max=0))
    outputs = stacked(x)
    assert len(outputs) == 2
    for linear, output in zip(folded, outputs):
        reference = linear(x)
        assert output.shape == reference.shape and output.dtype == reference.dtype
        assert _relative_error(output, reference) < FLOAT_ROUNDING


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_the_kernel_holds_the_codes_it_was_given(backend) -> None:
    transform = InputTransform(32, None, ActivationQuantizer(bits=4))
    folded = _folded(transform, 24, w_bits=4, w_symmetric=False, group_size=16, bias=False, seed=0)
    linear = IntegerLinear(IntegerInputTransform(transform), [folded], IntegerKernelConfig(backend=backend, int4_rows_max=0))
    assert torch.equal(linear.codes().to(torch.int16) + 8, folded.codes.to(torch.int16))
    assert linear.weight_bytes() >= folded.codes.numel()


def test_activation_codes_dequantize_to_the_fake_quantizer_output() -> None:
    for symmetric in (False, True):
        transform = InputTransform(48, None, ActivationQuantizer(bits=4, symmetric=symmetric, learnable_clip=True))
        x = torch.randn(2, 5, 48) * 4
        acts = IntegerInputTransform(transform)(x)
        assert acts.codes.dtype == torch.uint8 and int(acts.codes.max()) <= 15
        assert torch.equal(acts.dequantize(), transform(x))


@pytest.mark.parametrize("dim", [17, 40])
def test_int_mm_pads_shapes_its_rules_refuse(dim) -> None:
    """Inner and output sizes that are not multiples of 8, and fewer than 17 rows, still give the product."""
    transform = InputTransform(dim, None, ActivationQuantizer(bits=4))
    folded = _folded(transform, 13, w_bits=4, w_symmetric=True, group_size=None, bias=True, seed=1)
    linear = IntegerLinear(IntegerInputTransform(transform), [folded], IntegerKernelConfig(backend="int_mm", int4_rows_max=0))
    assert linear.weight_codes.shape[1] % 8 == 0 and linear.weight_codes.shape[2] % 8 == 0
    for rows in (1, 16, 40):
        x = torch.randn(rows, dim)
        assert _relative_error(linear(x), folded(x)) < FLOAT_ROUNDING


def test_grids_the_path_cannot_take_are_refused_by_name() -> None:
    folded_input = InputTransform(16, None, ActivationQuantizer(bits=4))
    float_weight = FoldedLinear(folded_input, weight=torch.randn(8, 16))
    assert "float weight" in integer_refusal(folded_input, [float_weight])
    assert "not quantized" in integer_refusal(InputTransform(16, None, ActivationQuantizer(bits=16)))
    assert "12-bit" in integer_refusal(InputTransform(16, None, ActivationQuantizer(bits=12)))
    assert "per-group" in integer_refusal(InputTransform(16, None, ActivationQuantizer(bits=4, group_size=8)))
    with pytest.raises(ValueError, match="not quantized"):
        IntegerInputTransform(InputTransform(16, None, ActivationQuantizer(bits=16)))


@pytest.mark.parametrize("field,value", [("backend", "cuda"), ("int4_rows_max", -1), ("int4_rows_max", 1.5),
                                         ("int4_rows_max", True)])
def test_config_values_are_refused_by_name(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        IntegerKernelConfig(**{field: value}).validate()


def test_onednn_backend_is_refused_off_the_cpu() -> None:
    with pytest.raises(ValueError, match="onednn"):
        resolve_backend("onednn", torch.device("meta"))
    assert resolve_backend("auto", torch.device("meta")) == "int_mm"


def test_decoding_rows_take_the_int4_kernel_below_the_threshold() -> None:
    transform = InputTransform(64, None, ActivationQuantizer(bits=4))
    folded = _folded(transform, 32, w_bits=4, w_symmetric=True, group_size=None, bias=True, seed=2)
    linear = IntegerLinear(IntegerInputTransform(transform), [folded], IntegerKernelConfig(int4_rows_max=2))
    assert linear.int4 is not None
    calls = []
    original = linear.int4.forward_transformed
    linear.int4.forward_transformed = lambda x: (calls.append(1), original(x))[1]
    for rows in (1, 2, 3):
        x = torch.randn(rows, 64)
        # The int4 kernel computes in bf16: within its rounding of the fake-quant output.
        assert _relative_error(linear(x), folded(x)) < 2e-2
    assert len(calls) == 2  # rows 1 and 2, not 3


# --------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module", params=[("qwen2", "householder"), ("llama", "hadamard_householder")],
                ids=lambda param: "-".join(param))
def saved_w4a4kv4(request, tmp_path_factory):
    model_type, structure = request.param
    model = _w4a4_model(model_type, structure)
    return save_quantized(model, tmp_path_factory.mktemp(f"{model_type}-{structure}") / "export")


def test_integer_model_logits_equal_the_fake_quant_model(saved_w4a4kv4) -> None:
    reference = load_quantized(saved_w4a4kv4)
    integer = load_quantized(saved_w4a4kv4, kernels="w4a4", integer_config=EVERY_ROW_INTEGER)
    kinds = {type(module).__name__ for module in integer.modules()}
    assert "IntegerLinear" in kinds and "FoldedLinear" not in kinds
    tokens = torch.randint(0, reference.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _relative_error(integer(tokens).logits, reference(tokens).logits) < 1e-4


def test_packed_kv_cache_decodes_as_the_fake_quant_cache(saved_w4a4kv4) -> None:
    reference = load_quantized(saved_w4a4kv4)
    integer = load_quantized(saved_w4a4kv4, kernels="w4a4", integer_config=EVERY_ROW_INTEGER)
    prompt = torch.randint(0, reference.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = integer(prompt, use_cache=True)
        layers = out.past_key_values.layers
        assert all(isinstance(layer, PackedKVLayer) for layer in layers)
        # 4-bit codes two to a byte: half the head dim per token and head.
        stored = layers[0].parts["keys"][0]
        assert stored.dtype == torch.uint8 and stored.shape[-1] * 2 == reference.config.hidden_size // \
            reference.config.num_attention_heads
        expected = reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        produced = integer.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(produced, expected)


def test_unfolded_or_kernel_served_models_are_refused() -> None:
    model = wrap_model(tiny_model("qwen2", hidden_size=64, intermediate_size=96), BlockQuantConfig())
    with pytest.raises(ValueError, match="not folded"):
        use_integer_kernels_(model)
    with pytest.raises(ValueError, match="HHDecoderBlock"):
        use_integer_kernels_(torch.nn.Linear(2, 2))


def test_linears_the_path_cannot_take_keep_their_form_with_a_warning(tmp_path) -> None:
    """W4A16 (activations unquantized): every quantized linear named in one warning each, none silent."""
    quant = BlockQuantConfig(w_bits=4, a_bits=16, w_init="minmax", rotation_structure="householder",
                             rotation_init=STRUCTURE_INIT["householder"])
    model = wrap_model(tiny_model("llama", hidden_size=64, intermediate_size=96), quant)
    for block in model.model.layers:
        block.fold_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = use_integer_kernels_(model)
    assert not report.integer
    names = set(report.fallback)
    assert names == {f"model.layers.{i}.linears.{name}" for i in range(2) for name in LINEAR_NAMES}
    messages = [str(warning.message) for warning in caught]
    assert all(any(message.startswith(name) and "not quantized" in message for message in messages)
               for name in names)
