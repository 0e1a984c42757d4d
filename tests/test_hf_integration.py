"""transformers integration: from_pretrained of a saved model equals load_quantized; without the import it fails."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_exports import EXPORT_KINDS, save_tiny_export

import hh_lightning  # noqa: F401 — registers the quantization method, as a user's import does
from hh_lightning.export import QUANT_CONFIG_NAME, WEIGHTS_NAME, load_quantized
from hh_lightning.files import content_sha256, file_record
from hh_lightning.hf_integration import LOAD_GUARD, LOAD_GUARD_KEY, QUANT_METHOD, _single_device

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=EXPORT_KINDS)
def export(request, tmp_path_factory):
    return save_tiny_export(request.param, tmp_path_factory.mktemp(request.param) / "quantized")


def _tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_from_pretrained_equals_load_quantized_exactly(export) -> None:
    from transformers import AutoModelForCausalLM

    reference = load_quantized(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    tokens = _tokens(reference.config.vocab_size)
    assert torch.equal(_logits(model, tokens), _logits(reference, tokens))  # difference exactly 0
    assert type(model) is type(reference)
    assert all(type(a) is type(b) for a, b in zip(model.model.layers, reference.model.layers, strict=True))
    assert model.config.quantization_config.quant_method == QUANT_METHOD and model.is_quantized
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # One config object, read by the model and each of its blocks, and the guard is gone from it.
    assert all(block.config is model.config for block in model.model.layers)
    assert not hasattr(model.config, LOAD_GUARD_KEY)
    # KV-cached decoding follows too.
    prompt, settings = tokens[:1, :6], dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))


def test_config_json_routes_from_pretrained_and_is_covered_by_the_integrity_record(export) -> None:
    config = json.loads((export / "config.json").read_text())
    meta = json.loads((export / QUANT_CONFIG_NAME).read_text())
    assert config[LOAD_GUARD_KEY] == LOAD_GUARD
    entry = config["quantization_config"]
    assert entry["quant_method"] == QUANT_METHOD and entry["format_version"] == meta["format_version"]
    for name in ("w_bits", "a_bits", "kv_bits", "w_group_size"):
        assert entry[name] == meta["block_quant_config"][name]
    assert meta["files"]["config.json"] == file_record(export / "config.json")


def test_pipeline_and_generate_work_on_the_loaded_model(export) -> None:
    from transformers import AutoTokenizer, pipeline

    generator = pipeline("text-generation", model=str(export))
    text = generator("the lobster", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("the lobster", return_tensors="pt")["input_ids"]
    expected = load_quantized(export).generate(ids, max_new_tokens=5, do_sample=False,
                                               pad_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)


def _edit_json(path: Path, edit) -> None:
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values, indent=2))


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_from_pretrained_refuses_a_damaged_export_naming_the_file(export, tmp_path, damage) -> None:
    from transformers import AutoModelForCausalLM

    copy = Path(shutil.copytree(export, tmp_path / "copy"))
    if damage == "weights":
        data = bytearray((copy / WEIGHTS_NAME).read_bytes())
        data[-3] ^= 0xFF
        (copy / WEIGHTS_NAME).write_bytes(bytes(data))
        name = WEIGHTS_NAME
    else:  # a valid edit that would change the logits: it must be refused like any other
        _edit_json(copy / "config.json", lambda values: values.update(rms_norm_eps=1e-3))
        name = "config.json"
    with pytest.raises(ValueError, match=f"{name}.*(sha256|bytes)"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_exports_without_the_transformers_entries_still_load(export, tmp_path) -> None:
    """Exports saved before config.json carried quantization_config load through load_quantized as before."""
    copy = Path(shutil.copytree(export, tmp_path / "old"))

    def strip(values):
        values.pop("quantization_config")
        values.pop(LOAD_GUARD_KEY)

    _edit_json(copy / "config.json", strip)

    def rerecord(meta):
        meta["files"]["config.json"] = file_record(copy / "config.json")
        meta["content_sha256"] = content_sha256(meta, exclude="content_sha256")

    _edit_json(copy / QUANT_CONFIG_NAME, rerecord)
    tokens = _tokens(load_quantized(export).config.vocab_size)
    assert torch.equal(_logits(load_quantized(copy), tokens), _logits(load_quantized(export), tokens))


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that finds this checkout's hh_lightning but has not imported it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_loading_without_the_import_fails_naming_the_package(export) -> None:
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"try:\n    AutoModelForCausalLM.from_pretrained({str(export)!r})\n"
            "except ValueError as error:\n    print('refused:', error)\n"
            "else:\n    print('loaded a model')\n"
            "print('imported:', 'hh_lightning' in sys.modules)\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "loaded a model" not in result.stdout
    refused = next(line for line in result.stdout.splitlines() if line.startswith("refused:"))
    assert "import hh_lightning" in refused and "pip install hh_lightning" in refused
    assert "imported: False" in result.stdout


def test_import_registers_lazily_and_keeps_files_free_of_torch() -> None:
    lazy = _python("import sys, hh_lightning.files\n"
                   "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
                   "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as quantizers\n"
                   f"print({QUANT_METHOD!r} in quantizers)\n")
    assert lazy.returncode == 0, lazy.stderr
    assert lazy.stdout.split() == ["[]", "True"]
    # transformers' registry loaded first: the import registers at once.
    eager = _python("from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as configs\n"
                    "import hh_lightning\n"
                    f"print({QUANT_METHOD!r} in configs)\n")
    assert eager.returncode == 0, eager.stderr
    assert eager.stdout.split() == ["True"]


def test_device_map_names_one_device() -> None:
    assert _single_device(None) == "cpu"
    assert _single_device("cpu") == _single_device({"": "cpu"}) == "cpu"
    assert _single_device(0) == _single_device({"": 0}) == "cuda:0"
    with pytest.raises(ValueError, match="one device"):
        _single_device({"model": "cpu", "lm_head": "cuda:0"})
    with pytest.raises(ValueError, match="offloaded"):
        _single_device("disk")


def test_from_pretrained_takes_the_serving_kernels_as_a_loading_attribute(export) -> None:
    """``quantization_config=HHLightningConfig(kernels=...)`` serves as ``load_quantized(kernels=...)`` does."""
    from transformers import AutoModelForCausalLM

    from hh_lightning.hf_integration import HHLightningConfig

    # The W4A4 export on integer codes; the HQQ W3 one (no 4-bit grid) with an int8 head.
    kernels, head, served_by = (("w4a4", "fp", "IntegerLinear") if export.parent.name.startswith("w4a4")
                                else (None, "int8", "Int8Linear"))
    reference = load_quantized(export, kernels=kernels, head=head)
    with pytest.warns(UserWarning, match="loading attributes"):
        model = AutoModelForCausalLM.from_pretrained(export, quantization_config=HHLightningConfig(kernels=kernels,
                                                                                                   head=head))
    served = {type(module).__name__ for module in model.modules()}
    assert served == {type(module).__name__ for module in reference.modules()} and served_by in served
    tokens = _tokens(reference.config.vocab_size)
    assert torch.equal(_logits(model, tokens), _logits(reference, tokens))
    with pytest.raises(ValueError, match="kernels"):
        AutoModelForCausalLM.from_pretrained(export, quantization_config=HHLightningConfig(kernels="int3"))
