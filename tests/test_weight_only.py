"""Weight-only HQQ quantization of whole tiny models, and its export."""

import pytest
import torch
from tiny_models import tiny_model

from hh_lightning.block import LINEAR_NAMES, BlockQuantConfig, wrap_model
from hh_lightning.export import export_size, load_quantized, save_quantized
from hh_lightning.hqq import hqq_quantize, rtn_quantize
from hh_lightning.linear import FoldedLinear
from hh_lightning.weight_only import quantize_weights_hqq, weight_only_config


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _relative_error(approx, exact):
    return float((approx - exact).norm() / exact.norm())


def _tokens(seed=0, shape=(4, 32)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_hqq_w4_g16_beats_rtn_and_stays_close_to_fp(model_type) -> None:
    fp = tiny_model(model_type)
    tokens = _tokens()
    reference = _logits(fp, tokens)
    # Wrapping first (rotations off) exposes the exact weights HQQ will see: γ folded into q/k/v/gate/up.
    model = wrap_model(tiny_model(model_type), weight_only_config(4, 16))
    targets = {(index, name): block.linears[name].transformed_weight().detach().clone()
               for index, block in enumerate(model.model.layers) for name in LINEAR_NAMES}
    quantize_weights_hqq(model, bits=4, group_size=16)

    hqq_abs = hqq_sq = rtn_abs = rtn_sq = 0.0
    for (index, name), weight in targets.items():
        folded = model.model.layers[index].linears[name]
        assert isinstance(folded, FoldedLinear) and folded.bits == 4 and folded.group_size == 16
        assert folded.scale.shape == (weight.shape[0], weight.shape[1] // 16)
        hqq_error = folded.dequantized_weight() - weight
        rtn_error = rtn_quantize(weight, 4, 16).dequantize() - weight
        hqq_abs += float(hqq_error.abs().sum())
        rtn_abs += float(rtn_error.abs().sum())
        hqq_sq += float(hqq_error.square().sum())
        rtn_sq += float(rtn_error.square().sum())
    # Measured on these models: HQQ/RTN ≈ 0.955 in mean |error| (HQQ's objective is l_0.7,
    # close to l1) and ≈ 0.86 in squared error.
    assert hqq_abs < 0.98 * rtn_abs
    assert hqq_sq < 0.95 * rtn_sq

    # Activations stay in full precision: no activation or KV quantizer is on.
    assert all(block.quant.a_bits == 16 and block.quant.kv_bits == 16 for block in model.model.layers)
    # W4 g16 on N(0, σ²) weights: a 16-entry group spans ≈ 3.5σ, step ≈ 0.23σ, so the rounding
    # error is ≈ 0.067σ rms (≈ 6% of each weight, a bit less after HQQ). Output errors of the 14
    # linears are close to independent and the embeddings, norms and residual path are exact, so
    # logits move by about that fraction: measured 0.054–0.068 over both models and three seeds.
    # The same models give 0.11–0.15 at W3, 0.28–0.34 at W2, and 0.15–0.20 with one linear per
    # layer scrambled, so 0.1 (1.5× the worst W4) still catches a wrong grid or fold.
    error = _relative_error(_logits(model, tokens), reference)
    assert error < 0.1, error


def test_plain_layers_are_solved_on_the_unscaled_weights() -> None:
    """Without rotations the norm's γ stays online, so HQQ sees W, not W·diag(γ)."""
    fp = tiny_model("llama")
    tokens = _tokens(3)
    layer = fp.model.layers[1]
    gamma = layer.input_layernorm.weight.detach()
    assert float(gamma.std()) > 0.1  # a γ far from constant, or the test could not tell the two apart
    weight = layer.self_attn.q_proj.weight.detach()
    model = quantize_weights_hqq(tiny_model("llama"), bits=4, group_size=16)
    solved = model.model.layers[1].linears["q_proj"].dequantized_weight()
    unscaled = hqq_quantize(weight * gamma.sign(), 4, 16, axis=1).dequantize()
    scaled = hqq_quantize(weight * gamma, 4, 16, axis=1).dequantize() / gamma
    # Only the fp16 rounding of scale and zero separates ours from the direct solve of W.
    assert _relative_error(solved, unscaled) < 1e-2
    assert _relative_error(solved, scaled) > 10 * _relative_error(solved, unscaled)
    # γ moved onto the activations: at 8 bits the model is the FP model up to rounding.
    eight_bit = quantize_weights_hqq(tiny_model("llama"), bits=8, group_size=16)
    assert _relative_error(_logits(eight_bit, tokens), _logits(fp, tokens)) < 1e-2


def test_w3_g16_export_round_trip(tmp_path) -> None:
    model = quantize_weights_hqq(tiny_model("qwen2"), bits=3, group_size=16)
    directory = save_quantized(model, tmp_path / "w3")
    loaded = load_quantized(directory)
    tokens = _tokens(1, (2, 21))
    assert torch.allclose(_logits(loaded, tokens), _logits(model, tokens), atol=1e-5, rtol=0)
    for index, block in enumerate(loaded.model.layers):
        for name in LINEAR_NAMES:
            original, reloaded = model.model.layers[index].linears[name], block.linears[name]
            assert reloaded.bits == 3 and reloaded.group_size == 16
            assert torch.equal(reloaded.codes, original.codes)
            assert torch.equal(reloaded.zero, original.zero)  # real-valued HQQ zeros survive exactly
    # 3-bit codes are 3/16 of fp16; an fp16 scale + zero per 16 weights add 1/8.
    assert export_size(directory)["linears"]["by_bits"][3]["ratio"] == pytest.approx(3 / 16 + 1 / 8)
    prompt = _tokens(2, (1, 5))
    assert loaded.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0).shape == (1, 10)


def test_rotated_hqq_after_pca_keeps_online_rotations(tmp_path) -> None:
    fp = tiny_model("llama")
    tokens = _tokens(3)
    reference = _logits(fp, tokens)
    quant = BlockQuantConfig(qkv_reflections=16, upgate_reflections=16, down_reflections=16, o_rotation="full",
                             o_reflections=8)
    model = wrap_model(tiny_model("llama"), weight_only_config(4, 16, rotate=True, quant=quant))
    with torch.no_grad():
        hidden = model.model.embed_tokens(tokens)
        for block in model.model.layers:
            block.init_rotations_pca_(block.collect_statistics(hidden))
            hidden = block(hidden)
    rotated = [block.linears["down_proj"].transformed_weight().detach().clone() for block in model.model.layers]
    plain = [block.linears["down_proj"].weight.detach().clone() for block in model.model.layers]
    quantize_weights_hqq(model, bits=4, group_size=16, rotate=True)
    for block, target, unrotated in zip(model.model.layers, rotated, plain):
        assert set(block.rotations()) == {"qkv", "o", "upgate", "down"}
        # HQQ was solved on the rotated weight: its dequantized form is close to W R, not to W.
        dequantized = block.linears["down_proj"].dequantized_weight()
        assert _relative_error(dequantized, target) < 0.1
        assert _relative_error(dequantized, unrotated) > 0.5
    assert _relative_error(_logits(model, tokens), reference) < 0.1
    loaded = load_quantized(save_quantized(model, tmp_path / "rotated"))
    assert torch.allclose(_logits(loaded, tokens), _logits(model, tokens), atol=1e-5, rtol=0)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="rotation_init='pca' needs calibrated rotations"):
        quantize_weights_hqq(tiny_model("qwen2"), rotate=True)
    wrapped = wrap_model(tiny_model("qwen2"), weight_only_config(4, 16, rotate=True))
    with pytest.raises(ValueError, match="layer 0: the block has rotations"):
        quantize_weights_hqq(wrapped, bits=4, group_size=16, rotate=False)
    w4a4 = wrap_model(tiny_model("qwen2"), BlockQuantConfig(rotation_init="random"))
    with pytest.raises(ValueError, match="layer 0: the block quantizes activations"):
        quantize_weights_hqq(w4a4, rotate=True)
    with pytest.raises(ValueError, match="w_group_size=24 does not divide"):
        quantize_weights_hqq(tiny_model("qwen2"), group_size=24)


def test_default_w4_g64_linears_take_packed_codes_plus_a_scale_and_zero_per_group(tmp_path) -> None:
    model = quantize_weights_hqq(tiny_model("llama", hidden_size=128, intermediate_size=256))
    sizes = export_size(save_quantized(model, tmp_path / "w4"))["linears"]
    # Packed codes are 1/4 of fp16; an fp16 scale + zero per 64 weights add 1/32; nothing else is stored.
    assert sizes["by_bits"][4]["ratio"] == pytest.approx(1 / 4 + 1 / 32)
