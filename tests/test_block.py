"""HHDecoderBlock against transformers' own decoder layers."""

import copy
import dataclasses

import pytest
import torch
from tiny_models import tiny_config, tiny_model

from hh_lightning.block import (
    TOKEN_RELATIVE_SUFFIX,
    BlockQuantConfig,
    HHDecoderBlock,
    check_model_type,
    wrap_model,
)
from hh_lightning.linear import rotations_disabled
from hh_lightning.quantizers import quantization_disabled

OFF = dict(w_bits=16, a_bits=16, kv_bits=16)


def _layer_output(model, index: int, hidden: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(hidden.shape[1])[None]
    embeddings = model.model.rotary_emb(hidden, positions)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=positions)
    return model.model.layers[index](hidden, attention_mask=mask, position_ids=positions,
                                     position_embeddings=embeddings)


STRUCTURES = ["householder", "kronecker", "hadamard_householder"]
# The untrained start each structure ships with.
STRUCTURE_INIT = {"householder": "pca", "kronecker": "hadamard", "hadamard_householder": "pca"}


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("o_rotation", ["head", "full"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_block_equals_transformers_layer_with_random_rotations(model_type, attn, o_rotation, structure) -> None:
    model = tiny_model(model_type, attn)
    quant = BlockQuantConfig(**OFF, rotation_init="random", o_rotation=o_rotation, kv_reflections=None,
                             qkv_reflections=16, down_reflections=None, smoothing=True,
                             rotation_structure=structure)
    block = HHDecoderBlock(model.model.layers[1], model.config, model.model.rotary_emb, quant, 1)
    with torch.no_grad():
        for parameter in block.parameters():
            if parameter.requires_grad and parameter.dim() == 1:  # smoothing scales
                parameter.normal_(0, 0.3)
    hidden = torch.randn(2, 11, model.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(block(hidden), _layer_output(model, 1, hidden), atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_wrapped_model_logits_match(model_type) -> None:
    model = tiny_model(model_type)
    reference = copy.deepcopy(model)
    wrap_model(model, BlockQuantConfig(**OFF, rotation_init="random", down_reflections=None))
    tokens = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, reference(tokens).logits, atol=1e-4)


def _quantized_block(model_type="qwen2", **overrides):
    model = tiny_model(model_type)
    quant = BlockQuantConfig(**{"w_bits": 4, "a_bits": 4, "kv_bits": 4, "kv_reflections": None,
                                "rotation_init": "pca", **overrides})
    block = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb, quant, 0)
    hidden = torch.randn(2, 16, model.config.hidden_size)
    block.init_rotations_pca_(block.collect_statistics(hidden))
    block.initialize_weight_quantizers()
    return block, hidden


@pytest.mark.parametrize("o_rotation", ["head", "full"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_fold_equals_fake_quant_block(o_rotation, structure) -> None:
    block, hidden = _quantized_block(o_rotation=o_rotation, w_group_size=16, w_symmetric=False,
                                     rotation_structure=structure, rotation_init=STRUCTURE_INIT[structure])
    with torch.no_grad():
        expected = block.round_rotations_()(hidden)  # what fold_ folds: the rotations in quant.rotation_dtype
        folded = copy.deepcopy(block).fold_()
        assert folded.is_folded
        assert torch.allclose(folded(hidden), expected, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_gptq_fold_lowers_the_block_error_of_nearest_rounding(model_type, act_order) -> None:
    """quant.w_rounding='gptq': same grid, codes chosen against each linear's input Hessian."""
    model = tiny_model(model_type)
    quant = BlockQuantConfig(w_bits=3, a_bits=16, qkv_reflections=8, upgate_reflections=8, down_reflections=8,
                             w_group_size=16, w_symmetric=False, w_rounding="gptq", gptq_act_order=act_order)
    block = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb, quant, 0)
    mixing = torch.eye(64) + torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) / 4
    hidden = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(4)) @ mixing  # correlated inputs
    block.init_rotations_pca_(block.collect_statistics(hidden))
    block.initialize_weight_quantizers()
    block.round_rotations_()
    with torch.no_grad(), quantization_disabled(block):
        reference = block(hidden)
    with pytest.raises(ValueError, match="w_rounding='gptq' folds with the inputs' statistics"):
        copy.deepcopy(block).fold_()
    statistics = block.collect_statistics(hidden)
    gptq = copy.deepcopy(block).fold_(statistics)
    nearest = copy.deepcopy(block)
    nearest.quant = dataclasses.replace(quant, w_rounding="nearest")
    nearest.fold_()
    with torch.no_grad():
        error_gptq = (gptq(hidden) - reference).pow(2).mean()
        error_nearest = (nearest(hidden) - reference).pow(2).mean()
    assert error_gptq < 0.8 * error_nearest
    for name in ("q_proj", "o_proj", "down_proj"):  # same grid, other codes
        assert torch.equal(gptq.linears[name].scale, nearest.linears[name].scale)
        assert not torch.equal(gptq.linears[name].codes, nearest.linears[name].codes)
    # q/k/v and gate/up are rounded as one stacked pass: the codes of one GPTQ pass per linear.
    from hh_lightning.block import LINEAR_INPUTS
    for name in LINEAR_INPUTS:
        linear = block.linears[name]
        alone = linear.fold(hessian=linear.transformed_hessian(statistics[LINEAR_INPUTS[name]][0]),
                            act_order=act_order)
        assert torch.equal(gptq.linears[name].codes, alone.codes), name


@pytest.mark.parametrize("structure", ["householder", "hadamard_householder"])
def test_token_relative_pca_statistics_weigh_every_token_alike(structure) -> None:
    """quant.pca_statistics='token_relative': each rotation input row is summed at unit mean square, the
    PCA init reads those sums, and GPTQ's raw sums are the ones a raw run records."""
    model = tiny_model("qwen2")
    overrides = dict(kv_reflections=None, o_rotation="full", rotation_structure=structure)
    relative = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb,
                              BlockQuantConfig(**overrides, pca_statistics="token_relative"), 0)
    raw = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb, BlockQuantConfig(**overrides), 0)
    hidden = torch.randn(2, 16, model.config.hidden_size)
    statistics = relative.collect_statistics(hidden)
    raw_statistics = raw.collect_statistics(hidden)
    suffix = TOKEN_RELATIVE_SUFFIX
    assert set(statistics) == set(raw_statistics) | {name + suffix for name in relative.rotations()}
    for name in raw_statistics:
        assert torch.equal(statistics[name][0], raw_statistics[name][0]), name
    for name, rotation in relative.rotations().items():
        gram, count = statistics[name + suffix]
        assert count == raw_statistics[name][1]
        # Every row has mean square 1, so the trace is the row count times d.
        assert torch.allclose(gram.trace(), count * rotation.dim, rtol=1e-6), name
    # Rescaling any row leaves its token-relative sum as it was.
    rows = torch.randn(40, relative.rotations()["down"].dim)
    scales = torch.logspace(-3, 3, 40)[:, None]
    relative._statistics = {}
    relative._record("down", rows)
    relative._record("upgate", torch.randn(3, relative.rotations()["upgate"].dim))
    first = relative._statistics["down" + suffix][0].clone()
    relative._statistics = {}
    relative._record("down", rows * scales)
    assert torch.allclose(relative._statistics["down" + suffix][0], first, rtol=1e-5, atol=1e-4)
    relative._statistics = None
    # The PCA init reads the token-relative sums.
    relative.init_rotations_pca_(statistics)
    for name, rotation in relative.rotations().items():
        expected = copy.deepcopy(rotation)
        gram, count = statistics[name + suffix]
        expected.init_pca_(gram / count, seed=relative.quant.seed)
        assert torch.allclose(rotation.matrix(), expected.matrix(), atol=1e-6), name


def test_statistics_do_not_depend_on_rotations() -> None:
    block, hidden = _quantized_block()
    before = copy.deepcopy(block).collect_statistics(hidden)
    with torch.no_grad():
        for rotation in block.rotations().values():
            for parameter in rotation.parameters():
                parameter.normal_()
    after = block.collect_statistics(hidden)
    assert before.keys() == after.keys()
    for name in before:  # exactly: the pass runs the FP layer with every rotation bypassed
        assert torch.equal(before[name][0], after[name][0]), name
    with torch.no_grad(), quantization_disabled(block):  # and the bypass was undone
        rotated = block(hidden)
        with rotations_disabled(block):
            plain = block(hidden)
    assert torch.allclose(rotated, plain, atol=1e-4) and not torch.equal(rotated, plain)


def test_quantization_changes_output_and_disabling_restores_it() -> None:
    model = tiny_model("llama")
    block, hidden = _quantized_block("llama")
    with torch.no_grad():
        quantized = block(hidden)
        with quantization_disabled(block):
            full = block(hidden)
        reference = _layer_output(model, 0, hidden)
    assert torch.allclose(full, reference, atol=1e-5)
    assert not torch.allclose(quantized, reference, atol=1e-3)


def test_kv_rotation_lowers_key_error_with_outlier_channel() -> None:
    from hh_lightning.quantizers import ActivationQuantizer
    from hh_lightning.rotation import HouseholderRotation

    torch.manual_seed(0)
    keys = torch.randn(2, 2, 64, 16)
    keys[..., 3] *= 30.0
    quantizer = ActivationQuantizer(bits=4)
    rotation = HouseholderRotation(16, 16, init="pca")
    rows = keys.reshape(-1, 16)
    rotation.init_pca_(rows.T @ rows / rows.shape[0])
    with torch.no_grad():
        plain_error = (quantizer(keys) - keys).pow(2).mean()
        rotated = rotation.rotate(keys)
        rotated_error = (rotation.rotate_transposed(quantizer(rotated)) - keys).pow(2).mean()
    assert rotated_error < 0.5 * plain_error


def test_kv_rotation_leaves_attention_unchanged_without_quantization() -> None:
    model = tiny_model("qwen2")
    hidden = torch.randn(1, 9, 64)
    plain = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb,
                           BlockQuantConfig(**OFF, kv_reflections=0, rotation_init="random"), 0)
    rotated = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb,
                             BlockQuantConfig(**OFF, kv_reflections=None, rotation_init="random"), 0)
    assert rotated.kv_rotation is not None
    with torch.no_grad():
        assert torch.allclose(plain(hidden), rotated(hidden), atol=1e-5)


@pytest.mark.parametrize("learnable", [False, True])
def test_kv_clip_ratios_are_trained_with_the_clips_only_when_asked(learnable) -> None:
    block, hidden = _quantized_block("qwen2", kv_bits=3, kv_learnable_clip=learnable)
    kv_clips = [parameter for quantizer in (block.k_quantizer, block.v_quantizer)
                for parameter in quantizer.parameters()]
    assert len(kv_clips) == (4 if learnable else 0)
    clips = block.parameter_groups()["clips"]
    assert all(any(parameter is clip for clip in clips) for parameter in kv_clips)
    target = _layer_output(tiny_model("qwen2"), 0, hidden).detach()
    torch.nn.functional.mse_loss(block(hidden), target).backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in kv_clips)
    if learnable:  # a clip ratio is a real setting of the cache's grid: moving it moves the output
        before = block(hidden).detach()
        with torch.no_grad():
            block.v_quantizer.clip_logit_max.fill_(0.0)
        assert not torch.allclose(block(hidden), before, atol=1e-4)


def test_bad_settings_name_the_field() -> None:
    config = tiny_config("qwen2")
    with pytest.raises(ValueError, match="quant.down_reflections=97"):
        BlockQuantConfig(down_reflections=97).validate(config)
    with pytest.raises(ValueError, match="quant.w_group_size=24 does not divide hidden_size=64"):
        BlockQuantConfig(w_group_size=24).validate(config)
    with pytest.raises(ValueError, match="weight bits=9"):
        BlockQuantConfig(w_bits=9).validate(config)
    with pytest.raises(ValueError, match="unknown quantization field"):
        BlockQuantConfig.from_dict({"wbits": 4})
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supported: llama, qwen2"):
        check_model_type(config)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_block_joins_its_layers_device(structure) -> None:
    """Parameters and buffers the block creates (rotations, signs, fixed factors, quantizer clips)
    land where the layer's weights are.

    The meta device stands in for a GPU: before, rotations stayed on the CPU and a CUDA
    layer failed at its first forward.
    """
    model = tiny_model("llama").to("meta")
    quant = BlockQuantConfig(rotation_structure=structure, rotation_init=STRUCTURE_INIT[structure],
                             kv_reflections=None, smoothing=True)
    block = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb, quant, 0)
    devices = {t.device.type for t in [*block.parameters(), *block.buffers()]}
    assert devices == {"meta"}
    # own_device (the loaders): what the block builds goes there, the copied weights stay on meta.
    block = HHDecoderBlock(model.model.layers[0], model.config, model.model.rotary_emb, quant, 0, own_device="cpu")
    weights = {id(linear.weight) for linear in block.linears.values()}
    assert all(t.device.type == "meta" for t in block.parameters() if id(t) in weights)
    assert block.rotations() and all(t.device.type == "cpu" for rotation in block.rotations().values()
                                     for t in [*rotation.parameters(), *rotation.buffers()])

