"""The on-disk format: bit packing, save → load round trips, integrity checks, sizes."""

import json
import shutil

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from hh_lightning import __version__
from hh_lightning.block import BlockQuantConfig, wrap_model
from hh_lightning.export import (
    QUANT_CONFIG_NAME,
    WEIGHTS_NAME,
    export_size,
    load_quantized,
    pack_codes,
    packed_numel,
    save_quantized,
    unpack_codes,
)
from hh_lightning.linear import InputTransform

OFF = dict(w_bits=16, a_bits=16, kv_bits=16)
# Large enough that per-channel scales don't dominate the byte count.
SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)




# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (17, 33), (64, 128)])
def test_pack_round_trip(bits, shape) -> None:
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=generator).to(torch.uint8)
    packed = pack_codes(codes, bits)
    numel = codes.numel()
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_numel(numel, bits)
    assert packed.numel() == (numel if bits == 8 else -(-numel // 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_pack_layout_is_dense_low_bits_first() -> None:
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x43, 0x65, 0x07]
    assert pack_codes(codes % 4, 2).tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 1 | 2 << 2 | 3 << 4 | 0 << 6]
    word = sum(int(code) << (3 * slot) for slot, code in enumerate(codes))
    assert pack_codes(codes, 3).tolist() == [(word >> (8 * byte)) & 0xFF for byte in range(3)]


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.tensor([1]), 4)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, (5,))


# ---------------------------------------------------------- W4A4KV4 model
STRUCTURE_INIT = {"householder": "pca", "kronecker": "hadamard", "hadamard_householder": "pca"}


def _w4a4_model(model_type: str, structure: str = "householder", **sizes) -> nn.Module:
    """An initialized, folded W4A4KV4 model (Qwen2: head R_o, tied; Llama: full R_o, untied lm_head);
    ``sizes`` override the config's (``vocab_size=len(tokenizer)``)."""
    model = tiny_model(model_type, **{**SIZES, **sizes})
    if model_type == "llama":
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter((model.lm_head.weight.detach().clone() + 0.01).bfloat16().float())
    quant = BlockQuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_init="minmax", qkv_reflections=16,
                             upgate_reflections=16, down_reflections=16, kv_reflections=None,
                             o_rotation="head" if model_type == "qwen2" else "full", o_reflections=8,
                             smoothing=model_type == "llama", rotation_structure=structure,
                             rotation_init=STRUCTURE_INIT[structure], kv_learnable_clip=model_type == "qwen2")
    wrap_model(model, quant)
    if quant.kv_learnable_clip:  # clip ratios away from their init, so a round trip that drops them fails
        with torch.no_grad():
            for index, block in enumerate(model.model.layers):
                for offset, quantizer in enumerate((block.k_quantizer, block.v_quantizer)):
                    quantizer.clip_logit_max.fill_(1.0 + 0.5 * offset + 0.25 * index)
                    quantizer.clip_logit_min.fill_(2.0 - 0.5 * offset)
    if quant.smoothing:  # scales away from 1, so a round trip or a serving path that drops them fails
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for transform in (m for m in model.modules() if isinstance(m, InputTransform)):
                if transform.log_smoothing is not None:
                    transform.log_smoothing.copy_(0.3 * torch.randn(transform.dim, generator=generator))
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model.embed_tokens(tokens)
        for block in model.model.layers:
            block.init_rotations_pca_(block.collect_statistics(hidden))
            block.initialize_weight_quantizers()
            block.fold_()
            hidden = block(hidden)
    return model.eval()


@pytest.fixture(scope="module", params=[("qwen2", "householder"), ("llama", "householder"),
                                        ("qwen2", "kronecker"), ("llama", "kronecker"),
                                        ("qwen2", "hadamard_householder"), ("llama", "hadamard_householder")],
                ids=lambda param: "-".join(param))
def saved(request, tmp_path_factory):
    model_type, structure = request.param
    model = _w4a4_model(model_type, structure)
    directory = save_quantized(model, tmp_path_factory.mktemp(model_type) / "quantized",
                               extra_metadata={"note": "test"})
    return model, directory


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_reload_gives_identical_logits(saved) -> None:
    model, directory = saved
    loaded = load_quantized(directory)
    tokens = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    reference = _logits(model, tokens)
    assert torch.allclose(_logits(loaded, tokens), reference, atol=1e-5, rtol=0)
    assert all(block.is_folded for block in loaded.model.layers)
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings


def _inference_caches(model: nn.Module) -> dict[tuple[int, str, str], object]:
    """Every cache entry the online rotations hold, by (layer, rotation, entry)."""
    entries = {}
    for index, block in enumerate(model.model.layers):
        for name, rotation in block.online_rotations().items():
            for part, module in rotation.named_modules():
                frozen = getattr(module, "_frozen_cache", None)
                if frozen is not None:
                    entries[(index, name, f"{part}._frozen_cache")] = frozen
                for key, fixed in getattr(module, "_fixed_cache", {}).items():
                    entries[(index, name, f"{part}._fixed_cache{key}")] = fixed
    return entries


def test_load_builds_the_rotations_inference_caches_that_the_forward_then_uses(saved) -> None:
    """Built lazily inside a long prefill, these caches pinned its temporaries in the heap: the
    loader builds them first, and the forward finds them rather than building its own."""
    model, directory = saved
    loaded = load_quantized(directory)
    before = _inference_caches(loaded)
    rotations = {(index, name) for index, block in enumerate(loaded.model.layers) for name in block.online_rotations()}
    assert rotations and {(index, name) for index, name, _ in before} == rotations
    tokens = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    _logits(loaded, tokens)
    after = _inference_caches(loaded)
    assert after.keys() == before.keys() and all(after[key] is before[key] for key in before)


def test_load_builds_on_meta_and_folds_nothing(saved, monkeypatch) -> None:
    """The loader never allocates the FP skeleton (transformers' model is built on the meta device)
    and never computes a fold: every value comes from the file, and nothing is left on meta."""
    import transformers

    from hh_lightning.linear import HHLinear

    model, directory = saved
    built_on = []
    from_config = transformers.AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        built = from_config(*args, **kwargs)
        built_on.append(built.model.embed_tokens.weight.device.type)
        return built

    def no_fold(*_, **__):
        raise AssertionError("load_quantized computed a fold")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", spy)
    monkeypatch.setattr(HHLinear, "fold", no_fold)
    loaded = load_quantized(directory)
    assert built_on == ["meta"]
    assert not [name for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]
                if tensor.device.type == "meta"]
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    tokens = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(_logits(loaded, tokens), _logits(model, tokens), atol=1e-5, rtol=0)


def test_reading_large_tensors_in_chunks_changes_nothing(saved, monkeypatch) -> None:
    """With a chunk size below every embedding, the chunked read gives the whole-tensor read's model."""
    import hh_lightning.loading as loading

    _, directory = saved
    whole = load_quantized(directory).state_dict()
    monkeypatch.setattr(loading, "LOAD_CHUNK_BYTES", 1000)  # a few rows of the tiny embeddings
    chunked = load_quantized(directory).state_dict()
    assert whole.keys() == chunked.keys()
    assert all(chunked[key].dtype == whole[key].dtype and torch.equal(chunked[key], whole[key]) for key in whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_another_dtype_casts_the_float_parts(saved, dtype) -> None:
    model, directory = saved
    loaded = load_quantized(directory, dtype=dtype)
    assert loaded.model.embed_tokens.weight.dtype == dtype and loaded.lm_head.weight.dtype == dtype
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings
    # Outside the blocks, every float tensor is the default load's, cast; inside, the blocks' values
    # (grids, rotations, clips) are the default load's exactly.
    reference_state = load_quantized(directory).state_dict()
    for key, value in loaded.state_dict().items():
        expected = reference_state[key]
        if key.startswith("model.layers."):
            assert torch.equal(value.double(), expected.double()), key
        elif expected.is_floating_point() and "rotary" not in key:
            assert torch.equal(value, expected.to(dtype)), key
    tokens = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    assert _logits(loaded, tokens).dtype == dtype


def test_generate_runs_on_loaded_model(saved) -> None:
    model, directory = saved
    loaded = load_quantized(directory)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = loaded.generate(prompt, **settings)
    assert generated.shape == (1, 11)
    # KV-cache decoding must agree with the saved model's and with recomputing without a cache,
    # in every step's logits, not only in the argmax (a dropped cache once agreed on the argmax).
    assert torch.equal(generated, model.generate(prompt, **settings))
    scores = dict(output_scores=True, return_dict_in_generate=True)
    cached = loaded.generate(prompt, **settings, **scores)
    uncached = loaded.generate(prompt, use_cache=False, **settings, **scores)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.scores, uncached.scores, strict=True):
        assert torch.allclose(step_cached, step_uncached, atol=1e-5, rtol=0)


def test_w4_weights_take_under_0p3_of_fp16(saved) -> None:
    _, directory = saved
    sizes = export_size(directory)["linears"]
    assert set(sizes["by_bits"]) == {4}
    assert sizes["ratio"] <= 0.3, sizes
    # Packed codes alone are a quarter of fp16; per-channel scales + uint8 zeros add ~2% at in=128.
    assert sizes["ratio"] >= 0.25


def test_export_size_counts_the_whole_file_by_kind(saved) -> None:
    model, directory = saved
    sizes = export_size(directory)
    assert sum(sizes["by_kind"].values()) == sizes["file_bytes"] == (directory / WEIGHTS_NAME).stat().st_size
    original = tiny_model(model.config.model_type, **SIZES, tie_word_embeddings=model.config.tie_word_embeddings)
    assert sizes["fp16_model_bytes"] == 2 * sum(p.numel() for p in original.parameters())
    # Embeddings are stored in 16 bits: 2 bytes per entry, once when tied.
    embedding = model.model.embed_tokens.weight.numel()
    assert sizes["by_kind"]["embeddings"] == 2 * embedding * (1 if model.config.tie_word_embeddings else 2)
    rotations = {key: value for key, value in _stored_tensors(directory).items() if "rotation." in key}
    assert sizes["by_kind"]["rotations"] == sum(t.numel() * t.element_size() for t in rotations.values())


def test_rotations_are_stored_in_the_rotation_dtype_without_loss(saved) -> None:
    """fold_ rounded every learned rotation value to quant.rotation_dtype (float16 by default), so the
    file holds them in 16 bits, and the reload test above shows nothing was lost."""
    model, directory = saved
    rotations = {key: value for key, value in _stored_tensors(directory).items() if "rotation." in key}
    assert rotations
    for key, value in rotations.items():
        assert value.dtype in (torch.float16, torch.int8), (key, value.dtype)  # int8: fixed signs
        if value.is_floating_point():
            assert torch.equal(value.float(), model.state_dict()[key].float()), key


def _stored_tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / WEIGHTS_NAME)


def test_quantization_config_records_format(saved) -> None:
    model, directory = saved
    meta = json.loads((directory / QUANT_CONFIG_NAME).read_text())
    assert meta["hh_lightning_version"] == __version__
    assert meta["block_quant_config"] == model.model.layers[0].quant.to_dict()
    assert meta["extra"] == {"note": "test"}
    for name in (WEIGHTS_NAME, "config.json"):
        assert meta["files"][name]["bytes"] == (directory / name).stat().st_size
    layer = meta["layers"][0]
    assert layer["linears"]["down_proj"] == {"shape": [128, 256], "bits": 4, "quantized": True,
                                             "group_size": None, "scale_dtype": "float32",
                                             "zero_dtype": "float32"}
    structure = model.model.layers[0].quant.rotation_structure
    expected = {  # R_qkv is rotation 0 of layer 0 (seed 0), the head-dim K/V rotation is rotation 3
        "householder": ({"dim": 128, "reflections": 16}, {"dim": 32, "reflections": 32}),
        "kronecker": ({"dim": 128, "factors": [8, 16]}, {"dim": 32, "factors": [4, 8]}),
        "hadamard_householder": ({"dim": 128, "reflections": 16, "seed": 0},
                                 {"dim": 32, "reflections": 32, "seed": 3}),
    }[structure]
    assert layer["rotations"]["qkv"] == {"structure": structure, **expected[0]}
    assert layer["rotations"]["kv"] == {"structure": structure, **expected[1]}
    assert (directory / "config.json").is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_weights_are_refused_naming_the_file(saved, tmp_path, damage) -> None:
    _, directory = saved
    copy_dir = tmp_path / "copy"
    shutil.copytree(directory, copy_dir)
    weights = copy_dir / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(weights).replace(".", r"\.")):
        load_quantized(copy_dir)


def _edit_json(path, edit) -> None:
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values, indent=2))


@pytest.mark.parametrize("name,edit", [
    # A valid edit that would silently change the logits: the record must refuse it.
    (QUANT_CONFIG_NAME, lambda meta: meta["block_quant_config"].update(a_bits=8)),
    (QUANT_CONFIG_NAME, lambda meta: meta["layers"][0]["linears"]["q_proj"].update(quantized=False)),
    ("config.json", lambda config: config.update(rms_norm_eps=1e-3)),
], ids=["a_bits", "linear_entry", "config_json"])
def test_edited_metadata_is_refused_naming_the_file(saved, tmp_path, name, edit) -> None:
    _, directory = saved
    copy_dir = tmp_path / "copy"
    shutil.copytree(directory, copy_dir)
    load_quantized(copy_dir)  # the untouched copy loads
    _edit_json(copy_dir / name, edit)
    with pytest.raises(ValueError, match=str(copy_dir / name).replace(".", r"\.")):
        load_quantized(copy_dir)


# ------------------------------------------------------------- refusals
def test_save_refuses_unfolded_or_unwrapped_layers(tmp_path) -> None:
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match=r"layer 0 \(model\.layers\.0\) is a Qwen2DecoderLayer"):
        save_quantized(model, tmp_path / "out")
    wrap_model(model, BlockQuantConfig(**OFF, rotation_init="random"))
    model.model.layers[0].fold_()
    with pytest.raises(ValueError, match=r"layer 1 \(model\.layers\.1\) is not folded"):
        save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


class _BrokenTokenizer:
    def save_pretrained(self, directory) -> None:
        raise OSError("disk full")


def test_save_replaces_directory_and_a_failed_save_keeps_the_old_one(tmp_path) -> None:
    model = tiny_model("llama")
    wrap_model(model, BlockQuantConfig(w_bits=4, a_bits=16, kv_bits=16, w_init="minmax",
                                       rotation_init="random", qkv_reflections=8, upgate_reflections=8,
                                       down_reflections=8, o_reflections=4))
    for block in model.model.layers:
        block.fold_()
    target = tmp_path / "model"
    save_quantized(model, target, extra_metadata={"run": 1})
    save_quantized(model, target, extra_metadata={"run": 2})
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    assert json.loads((target / QUANT_CONFIG_NAME).read_text())["extra"] == {"run": 2}
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, target, tokenizer=_BrokenTokenizer(), extra_metadata={"run": 3})
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    assert json.loads((target / QUANT_CONFIG_NAME).read_text())["extra"] == {"run": 2}
    tokens = torch.randint(0, 128, (1, 9))
    assert torch.allclose(_logits(load_quantized(target), tokens), _logits(model, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])  # tied and untied tables
def test_an_int8_head_is_stored_as_the_rows_the_int8_loader_serves(model_type, tmp_path) -> None:
    """``save_quantized(head="int8")``: the file holds per-row int8 codes and float32 scales (one set
    when tied), loads to the same int8 modules and logits as ``head="int8"`` on a 16-bit export, and
    loads as float weights ``codes · scale`` with ``head="fp"``."""
    from hh_lightning.kernels import Int8Embedding, Int8Linear, int8_rows

    model = _w4a4_model(model_type)
    tied = model.config.tie_word_embeddings
    sixteen = save_quantized(model, tmp_path / "fp")
    int8 = save_quantized(model, tmp_path / "int8", head="int8")
    stored = _stored_tensors(int8)
    assert not any(key.endswith(("embed_tokens.weight", "lm_head.weight")) for key in stored)
    codes, scale = int8_rows(model.model.embed_tokens.weight.detach())
    assert torch.equal(stored["model.embed_tokens.codes"], codes) and torch.equal(stored["model.embed_tokens.scale"], scale)
    assert ("lm_head.codes" in stored) != tied
    assert json.loads((int8 / QUANT_CONFIG_NAME).read_text())["head"] == "int8"
    table = model.model.embed_tokens.weight.numel()
    saved_bytes = export_size(sixteen)["by_kind"]["embeddings"] - export_size(int8)["by_kind"]["embeddings"]
    assert saved_bytes == (1 if tied else 2) * (table - 4 * model.config.vocab_size)  # 2 -> 1 byte, + fp32 scales

    tokens = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    from_codes, from_weights = load_quantized(int8, head="int8"), load_quantized(sixteen, head="int8")
    assert isinstance(from_codes.model.embed_tokens, Int8Embedding) and isinstance(from_codes.lm_head, Int8Linear)
    assert torch.equal(_logits(from_codes, tokens), _logits(from_weights, tokens))
    as_float = load_quantized(int8)
    expected = codes.float() * scale[:, None]
    assert torch.equal(as_float.model.embed_tokens.weight, expected)
    assert (as_float.lm_head.weight is as_float.model.embed_tokens.weight) == tied
    # Float32 products of the same rows: the int8 head's logits to its bf16 compute.
    assert float((_logits(as_float, tokens) - _logits(from_codes, tokens)).norm()
                 / _logits(as_float, tokens).norm()) < 2e-2
