"""The Python API refuses bad arguments: every parameter of quantize, load_quantized and save_quantized.

Each bad value raises the documented exception (``TypeError`` for a wrong type, ``FileNotFoundError``
for a missing file, ``ValueError`` otherwise, never ``SystemExit``) with one line naming the
argument or field, prints no usage text and writes nothing.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import make_config, write_config
from tiny_exports import save_tiny_export
from tiny_models import save_tiny_checkpoint, tiny_model

import hh_lightning
from hh_lightning.export import load_quantized, save_quantized

ABSENT_DEVICE = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tiny FP checkpoint, an export of it, a recipe whose run and cache would go under ``out``,
    and the export loaded back (folded, so save_quantized takes it)."""
    tmp = tmp_path_factory.mktemp("api")
    model_dir = save_tiny_checkpoint(tmp / "fp", "llama")
    export = save_tiny_export("hqq-w3-g16", tmp / "export")
    recipe = write_config(tmp, make_config(tmp / "out", model_dir, "run"), "recipe")
    return {"tmp": tmp, "fp": model_dir, "export": export, "recipe": recipe, "folded": load_quantized(export)}


def _file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


def _recipe_with(inputs: dict, tmp: Path, **changes) -> Path:
    """The recipe with ``changes`` (``section={key: value}``) applied, written under ``tmp``."""
    config = yaml.safe_load(inputs["recipe"].read_text())
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return write_config(tmp, config, "changed")


def _integer_config(**fields):
    from hh_lightning.integer import IntegerKernelConfig

    return IntegerKernelConfig(**fields)


def _quantize(inputs: dict, **arguments) -> None:
    hh_lightning.quantize(**{"model": str(inputs["fp"]), "recipe": inputs["recipe"], **arguments})


def _load(inputs: dict, **arguments) -> None:
    load_quantized(**{"directory": inputs["export"], **arguments})


def _save(inputs: dict, tmp: Path, **arguments) -> None:
    save_quantized(**{"model": inputs["folded"], "directory": tmp / "saved", **arguments})


CALLS = {"quantize": (hh_lightning.quantize, _quantize), "load_quantized": (load_quantized, _load),
         "save_quantized": (save_quantized, _save)}

# (function, parameter) -> [(case, arguments built from tmp and inputs, exception, what its message holds)]
BAD_API_ARGUMENTS = {
    ("quantize", "model"): [
        ("int", lambda tmp, inputs: {"model": 42}, TypeError, "model: expected"),
        ("empty", lambda tmp, inputs: {"model": ""}, ValueError, "model is empty"),
        ("missing", lambda tmp, inputs: {"model": str(tmp / "no_model")}, FileNotFoundError, "data.model"),
        ("an-export", lambda tmp, inputs: {"model": str(inputs["export"])}, ValueError, "is an hh_lightning export"),
        ("loaded-without-tokenizer", lambda tmp, inputs: {"model": tiny_model("llama")}, ValueError, "tokenizer"),
    ],
    ("quantize", "recipe"): [
        ("none", lambda tmp, inputs: {"recipe": None}, TypeError, "recipe: expected"),
        ("missing", lambda tmp, inputs: {"recipe": tmp / "no.yaml"}, FileNotFoundError, "recipe: file not found"),
        ("binary", lambda tmp, inputs: {"recipe": _file(tmp, "bin.yaml", bytes(range(256)))}, ValueError,
         "recipe: "),
        ("malformed", lambda tmp, inputs: {"recipe": _file(tmp, "bad.yaml", b"trainer: [1\n")}, ValueError,
         "not valid YAML"),
        ("unknown-key", lambda tmp, inputs: {"recipe": _recipe_with(inputs, tmp, bogus=1)}, ValueError, "bogus"),
        ("duplicate-layers", lambda tmp, inputs: {"recipe": _recipe_with(inputs, tmp, pipeline={"layers": [0, 0]})},
         ValueError, "pipeline.layers=[0, 0] repeats 0"),
    ],
    ("quantize", "tokenizer"): [
        ("with-a-path", lambda tmp, inputs: {"tokenizer": "gpt2"}, ValueError, "tokenizer: given with a model path"),
        ("not-a-tokenizer", lambda tmp, inputs: {"model": tiny_model("llama"), "tokenizer": "gpt2"}, TypeError,
         "tokenizer: expected"),
    ],
    ("quantize", "run_dir"): [
        ("int", lambda tmp, inputs: {"run_dir": 42}, TypeError, "run_dir: expected"),
        ("under-a-file", lambda tmp, inputs: {"run_dir": _file(tmp, "a_file", b"x") / "run"}, ValueError,
         "pipeline.run_dir="),
    ],
    ("quantize", "overrides"): [
        ("a-string", lambda tmp, inputs: {"overrides": "--trainer.max_epochs=2"}, TypeError, "overrides: expected"),
        ("not-an-option", lambda tmp, inputs: {"overrides": ["trainer.max_epochs=2"]}, ValueError, "overrides[0]"),
        ("ill-typed", lambda tmp, inputs: {"overrides": ["--trainer.max_epochs=two"]}, ValueError,
         "trainer.max_epochs='two'"),
        ("not-finite", lambda tmp, inputs: {"overrides": ["--model.optim.lr_clips=nan"]}, ValueError,
         "model.optim.lr_clips=nan must be a finite number"),
        ("unknown", lambda tmp, inputs: {"overrides": ["--model.quant.w_bitz=3"]}, ValueError, "w_bitz"),
        ("absent-device", lambda tmp, inputs: {"overrides": [f"--data.device={ABSENT_DEVICE}"]}, ValueError,
         "data.device="),
    ],
    ("load_quantized", "directory"): [
        ("int", lambda tmp, inputs: {"directory": 42}, TypeError, "directory: expected"),
        ("missing", lambda tmp, inputs: {"directory": tmp / "none"}, FileNotFoundError, "directory: "),
        ("a-file", lambda tmp, inputs: {"directory": _file(tmp, "f", b"x")}, ValueError, "directory: "),
        ("fp-model", lambda tmp, inputs: {"directory": inputs["fp"]}, FileNotFoundError,
         "is not a saved hh_lightning model"),
    ],
    ("load_quantized", "device"): [
        ("unknown", lambda tmp, inputs: {"device": "gpu9"}, ValueError, "device='gpu9'"),
        ("absent", lambda tmp, inputs: {"device": ABSENT_DEVICE}, ValueError, f"device='{ABSENT_DEVICE}'"),
    ],
    ("load_quantized", "kernels"): [("unknown", lambda tmp, inputs: {"kernels": "int8"}, ValueError, "kernels=")],
    ("load_quantized", "dtype"): [
        ("a-string", lambda tmp, inputs: {"dtype": "fp16"}, TypeError, "dtype: expected"),
        ("integer", lambda tmp, inputs: {"dtype": torch.int8}, ValueError, "dtype=torch.int8"),
    ],
    ("load_quantized", "head"): [("unknown", lambda tmp, inputs: {"head": "int4"}, ValueError, "head=")],
    ("load_quantized", "integer_config"): [
        ("a-string", lambda tmp, inputs: {"kernels": "w4a4", "integer_config": "fast"}, TypeError,
         "integer_config: expected"),
        ("bad-field", lambda tmp, inputs: {"kernels": "w4a4", "integer_config": _integer_config(backend="gpu9")},
         ValueError, "integer_config: backend="),
    ],
    ("save_quantized", "model"): [
        ("int", lambda tmp, inputs: {"model": 42}, TypeError, "model: expected"),
        ("not-folded", lambda tmp, inputs: {"model": tiny_model("llama")}, ValueError, "not an HHDecoderBlock"),
    ],
    ("save_quantized", "directory"): [
        ("int", lambda tmp, inputs: {"directory": 42}, TypeError, "directory: expected"),
        ("a-file", lambda tmp, inputs: {"directory": _file(tmp, "f", b"x")}, FileExistsError, "directory: "),
        ("under-a-file", lambda tmp, inputs: {"directory": _file(tmp, "g", b"x") / "saved"}, ValueError,
         "directory="),
    ],
    ("save_quantized", "tokenizer"): [("int", lambda tmp, inputs: {"tokenizer": 42}, TypeError, "tokenizer: ")],
    ("save_quantized", "extra_metadata"): [
        ("list", lambda tmp, inputs: {"extra_metadata": [1]}, TypeError, "extra_metadata: expected"),
        ("not-json", lambda tmp, inputs: {"extra_metadata": {"x": object()}}, ValueError, "extra_metadata"),
    ],
    ("save_quantized", "storage_dtype"): [
        ("fp32", lambda tmp, inputs: {"storage_dtype": torch.float32}, ValueError, "storage_dtype="),
    ],
    ("save_quantized", "head"): [("unknown", lambda tmp, inputs: {"head": "int4"}, ValueError, "head=")],
}
CASES = [(function, parameter, case[0]) for (function, parameter), cases in BAD_API_ARGUMENTS.items()
         for case in cases]


def test_every_parameter_has_a_bad_case() -> None:
    for name, (function, _) in CALLS.items():
        parameters = set(inspect.signature(function).parameters)
        assert {parameter for function_name, parameter in BAD_API_ARGUMENTS if function_name == name} == parameters


def _tree(root: Path) -> dict:
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")}


@pytest.mark.parametrize("function,parameter,case", CASES, ids="-".join)
def test_bad_argument_raises_the_documented_error_in_one_line_and_writes_nothing(
        inputs, tmp_path, monkeypatch, capsys, function, parameter, case) -> None:
    _, build, error_type, message = next(entry for entry in BAD_API_ARGUMENTS[function, parameter]
                                         if entry[0] == case)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs").mkdir()
    arguments = build(tmp_path / "inputs", inputs)
    before = {root: _tree(root) for root in (tmp_path, inputs["tmp"])}
    call = CALLS[function][1]
    with pytest.raises(error_type) as error_info:
        call(inputs, tmp_path, **arguments) if function == "save_quantized" else call(inputs, **arguments)
    text = str(error_info.value)
    assert message in text and "\n" not in text, text
    captured = capsys.readouterr()
    assert "usage" not in captured.out + captured.err and "Traceback" not in captured.err
    assert {root: _tree(root) for root in (tmp_path, inputs["tmp"])} == before
    assert not (inputs["tmp"] / "out").exists()
