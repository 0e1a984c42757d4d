"""train.py fit end to end on a tiny model: run, rerun, resume after SIGKILL, layer-parallel, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_exports import save_tiny_export
from tiny_models import WIKITEXT_DIR, save_tiny_checkpoint, tiny_model, tiny_tokenizer

from hh_lightning.block import BlockQuantConfig
from hh_lightning.cli import main
from hh_lightning.datamodule import BlockActivationDataModule
from hh_lightning.export import load_quantized
from hh_lightning.module import LayerRecipe, OptimConfig
from hh_lightning.pipeline import PipelineConfig, QuantizationRun

REPO = Path(__file__).resolve().parents[1]

# Child processes: tiny matmuls gain nothing from a second thread and lose much when the box is busy.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
QUANT = dict(qkv_reflections=8, upgate_reflections=8, down_reflections=8, kv_bits=4, kv_reflections=None)


def make_config(tmp: Path, model_dir: Path, run_name: str, **pipeline) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "enable_progress_bar": False,
                    "log_every_n_steps": 1},
        "model": {"quant": dict(QUANT), "optim": {"lr_transforms": 0.01, "lr_clips": 0.05}},
        "data": {"model": str(model_dir), "data_dir": str(WIKITEXT_DIR), "n_samples": 4, "val_samples": 2,
                 "seq_len": 32, "batch_size": 2, "cache_dir": str(tmp / "cache")},
        "pipeline": {"run_dir": str(tmp / run_name), "eval_seq_len": 32, "eval_windows": 2, **pipeline},
    }


def write_config(tmp: Path, config: dict, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_from_config(config: dict) -> QuantizationRun:
    """The same run the CLI builds, from plain Python objects (no parsing)."""
    return QuantizationRun(
        LayerRecipe(quant=BlockQuantConfig(**config["model"]["quant"]), optim=OptimConfig(**config["model"]["optim"])),
        BlockActivationDataModule(**config["data"]), dict(config["trainer"]), PipelineConfig(**config["pipeline"]))


def artifact_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((run_dir / "layers").glob("layer_*.safetensors")):
        tensors.update({f"{path.stem}.{k}": v for k, v in load_file(path).items()})
    return tensors


def assert_same_model(run_a: Path, run_b: Path) -> None:
    a, b = artifact_tensors(run_a), artifact_tensors(run_b)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    model_dir = save_tiny_checkpoint(tmp / "tiny-llama", "llama")
    return tmp, model_dir


@pytest.fixture(scope="module")
def baseline(workspace):
    """One uninterrupted sequential run that the other tests compare against."""
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "baseline")
    cli = main(["fit", "--config", str(write_config(tmp, config, "baseline"))])
    return config, cli.summary


def test_fit_writes_layers_summary_export_and_rerun_skips(workspace, baseline) -> None:
    tmp, _ = workspace
    config, summary = baseline
    run_dir = Path(config["pipeline"]["run_dir"])
    assert len(summary["layers"]) == 2
    for layer in summary["layers"]:
        assert layer["mse_folded"] == pytest.approx(layer["mse_final"], rel=1e-4)
    assert summary["quantized"]["ppl"] > 1 and summary["fp"]["n_windows"] == 2
    for name in ("summary.json", "summary.md", "layer_mse.png", "config.yaml", "run.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "logs" / "layer_000" / "metrics.csv").is_file()
    assert "layers [####################] 2/2 (layer 1 done)" in (run_dir / "logs" / "progress.log").read_text()
    # Verified artifacts replace the checkpoints; the export is reported whole, by kind of tensor.
    assert not list((run_dir / "checkpoints").glob("layer_*"))
    sizes = summary["export_size"]
    assert sizes["file_bytes"] == (run_dir / "quantized" / "model.safetensors").stat().st_size
    assert sum(sizes["by_kind"].values()) == sizes["file_bytes"]
    assert "Export size" in (run_dir / "summary.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "layers").iterdir()}
    again = main(["fit", "--config", str(tmp / "baseline.yaml")]).summary
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "layers").iterdir()} == stamps
    assert again["quantized"]["ppl"] == pytest.approx(summary["quantized"]["ppl"], rel=1e-6)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_resume_after_a_stop_mid_layer_equals_uninterrupted(workspace, baseline, stop) -> None:
    tmp, model_dir = workspace
    name = f"stopped_{stop.name.lower()}"
    config = make_config(tmp, model_dir, name)
    path = write_config(tmp, config, name)
    run_dir = Path(config["pipeline"]["run_dir"])
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT: restore the
    # default so the child sees Ctrl-C as a terminal user's run would, however this suite was started.
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", "--config", str(path)],
                               cwd=REPO, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = run_dir / "checkpoints" / "layer_001" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=300)
    if stop == signal.SIGINT:  # Ctrl-C: one line saying where it stopped and that a rerun resumes
        assert process.returncode == 130, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("interrupted during layer 1 (2 of 2); rerun the same command to resume"), last
    assert checkpoint.exists(), "the run ended before layer 1 saved a checkpoint"
    assert not (run_dir / "layers" / "layer_001.json").exists(), "killed too late: layer 1 already finished"
    main(["fit", "--config", str(path)])
    assert_same_model(Path(baseline[0]["pipeline"]["run_dir"]), run_dir)
    tokens = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        resumed = run_from_config(config).assemble()(tokens).logits
        reference = run_from_config(baseline[0]).assemble()(tokens).logits
    assert torch.allclose(resumed, reference, atol=1e-5)


def test_layer_parallel_two_cpu_workers_equal_sequential(workspace, baseline) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "parallel", layer_parallel=True)
    config["trainer"]["devices"] = 2
    main(["fit", "--config", str(write_config(tmp, config, "parallel"))])
    assert_same_model(Path(baseline[0]["pipeline"]["run_dir"]), Path(config["pipeline"]["run_dir"]))


def test_launched_rank_one_trains_its_share_and_logs(workspace, baseline) -> None:
    """As under torchrun: RANK=1 of WORLD_SIZE=2 trains layer 1 only, with its own logs."""
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "torchrun", layer_parallel=True)
    path = write_config(tmp, config, "torchrun")
    env = {**CHILD_ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = Path(config["pipeline"]["run_dir"])
    assert (run_dir / "layers" / "layer_001.json").is_file()
    assert not (run_dir / "layers" / "layer_000.json").exists()
    assert (run_dir / "logs" / "layer_001" / "metrics.csv").is_file()


def test_quantized_input_mode_runs_sequentially(workspace) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "sequential")
    config["data"]["input_mode"] = "quantized"
    config["trainer"]["max_epochs"] = 1
    summary = main(["fit", "--config", str(write_config(tmp, config, "sequential"))]).summary
    run_dir = Path(config["pipeline"]["run_dir"])
    # Layer 1 read the quantized output of layer 0; the last layer's output feeds nothing.
    assert sorted(p.name for p in (run_dir / "quantized_inputs").iterdir()) == ["boundary_001.bin"]
    assert len(summary["layers"]) == 2


def test_keep_checkpoints_keeps_them(workspace, baseline) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "kept", keep_checkpoints=True, layers=[0])
    main(["fit", "--config", str(write_config(tmp, config, "kept"))])
    assert (Path(config["pipeline"]["run_dir"]) / "checkpoints" / "layer_000" / "last.ckpt").is_file()


# CUDA (and the GPU accelerators) are absent on a CPU-only torch; on a GPU machine, a device past its count.
ABSENT_DEVICE = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
ABSENT_ACCELERATOR = "mps" if torch.cuda.is_available() else "gpu"
BAD_INPUT = [
    ({"pipeline.layers": [0, 0]}, "pipeline.layers=[0, 0] repeats 0"),
    ({"trainer.devices": [0, 0], "pipeline.layer_parallel": True}, "trainer.devices=[0, 0] repeats 0"),
    ({"trainer.accelerator": ABSENT_ACCELERATOR}, f"trainer.accelerator='{ABSENT_ACCELERATOR}'"),
    ({"trainer.accelerator": "abacus"}, "trainer.accelerator='abacus' is not one of"),
    ({"data.device": ABSENT_DEVICE}, f"data.device='{ABSENT_DEVICE}'"),
    ({"trainer.devices": [0]}, "trainer: `devices`"),  # Lightning's own refusal, in one line
    ({"model.quant": {**QUANT, "w_bits": 9}}, "quant.w_bits=9"),
    ({"model.quant": {**QUANT, "w_group_size": 24}}, "quant.w_group_size=24 does not divide"),
    ({"model.quant": {**QUANT, "down_reflections": 500}}, "quant.down_reflections=500"),
    ({"model.quant": {**QUANT, "a_clip_ratio_init": 1.5}}, "quant.a_clip_ratio_init=1.5 must be in (0, 1]"),
    ({"model.optim": {"lr_transforms": -0.01}}, "model.optim.lr_transforms=-0.01 must be"),
    ({"model.optim": {"min_lr_ratio": 0.0}}, "model.optim.min_lr_ratio=0.0 must be in (0, 1]"),
    ({"pipeline.layers": [0, 7]}, "pipeline.layers contains 7"),
    ({"pipeline.layers": [0, 2], "data.input_mode": "quantized"}, "pipeline.layers=[0, 2] has gaps"),
    ({"pipeline.layer_parallel": True, "data.input_mode": "quantized"}, "needs data.input_mode='fp'"),
    ({"pipeline.eval_windows": 0}, "pipeline.eval_windows=0 must be >= 1"),
    ({"pipeline.statistics_samples": -3}, "pipeline.statistics_samples=-3 must be >= 1"),
    ({"pipeline.eval_split": "tset"}, "pipeline.eval_split='tset' is not one of"),
    ({"trainer.max_epochs": 0}, "trainer.max_epochs=0 trains nothing"),
    ({"trainer.max_epochs": -1}, "trainer.max_epochs=-1 trains nothing"),
    ({"trainer.max_steps": 0}, "trainer.max_steps=0 must be >= 1"),
    ({"trainer.devices": 2}, "names 2 devices, but each layer trains on one"),
    ({"trainer.callbacks": [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]},
     "trainer.callbacks="),
    ({"trainer.logger": False}, "trainer.logger=False is not supported"),
    ({"trainer.default_root_dir": "elsewhere"}, "trainer.default_root_dir='elsewhere' is not supported"),
    ({"trainer.enable_checkpointing": False}, "trainer.enable_checkpointing=False is not supported"),
    ({"data.seq_len": 100000}, "data.seq_len=100000 exceeds the model's context"),
    ({"data.n_samples": 0}, "data.n_samples=0 must be >= 1"),
    ({"model.quant": {**QUANT, "w_bitz": 4}}, "w_bitz"),
    ({"data.batch_size": -2}, "data.batch_size=-2 must be >= 1"),
    ({"data.model": "/nonexistent/model"}, "model path not found: /nonexistent/model"),
]


@pytest.mark.parametrize("changes,message", BAD_INPUT, ids=lambda value: ",".join(value) if isinstance(value, dict)
                         else None)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, capsys, changes, message) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "bad")
    for dotted, value in changes.items():
        section, key = dotted.split(".", 1)
        config[section][key] = value
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp, config, "bad"))])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines
    assert not (tmp / "bad").exists()


# An out-of-range (or ill-typed) value for every field of every section; path fields are in BAD_PATHS.
# test_every_field_has_a_bad_value keeps this table complete as fields are added.
BAD_FIELD_VALUES = {
    **{f"model.quant.{name}": value for name, value in dict(
        w_bits=1, w_symmetric="maybe", w_group_size=0, w_learnable_clip="maybe", w_init="median", a_bits=17,
        a_symmetric="maybe", a_learnable_clip="maybe", a_clip_ratio_init=0.0, kv_bits=1, kv_symmetric="maybe",
        kv_learnable_clip="maybe", rotation_structure="circulant", qkv_reflections=-1, o_rotation="half",
        o_reflections=10_000, upgate_reflections=-2, down_reflections=10_000, kv_reflections=-1, rotation_init="zeros",
        rotation_dtype="float8", smoothing="maybe", seed=-1, seed_layer_stride=3, dense_apply_ratio=1.5,
        w_search={"grid_points": 0}, w_hqq={"kappa": 0.5}, w_rounding="stochastic", gptq_damp=-0.1,
        gptq_act_order="maybe", train_weights_quantized="maybe", pca_statistics="whitened").items()},
    **{f"model.optim.{name}": value for name, value in dict(
        lr_transforms=float("nan"), lr_clips=-1.0, lr_smoothing=-0.5, weight_decay=-0.1, min_lr_ratio=1.5,
        betas=[0.9, 1.0], warmup_ratio=1.0, compile="fastest", loss="l1").items()},
    **{f"data.{name}": value for name, value in dict(
        attn_implementation="fast", calibration_split="tset", n_samples=-1, val_samples=0, seq_len=0, seed=-5,
        cache_dtype="float32", cache_batch_size=0, batch_size=0, num_workers=-1, input_mode="int4",
        allow_generated_fallback="maybe", device="gpu9", model_dtype="float64", verify_cache="maybe").items()},
    **{f"pipeline.{name}": value for name, value in dict(
        layers=[-1], layer_parallel="maybe", statistics_samples=0, eval_split="train2", eval_seq_len=1,
        eval_windows=-4, eval_fp="maybe", export="maybe", export_head="int3", keep_checkpoints="maybe").items()},
}
PATH_FIELDS = {"data.model", "data.gguf_file", "data.calibration", "data.data_dir", "data.cache_dir",
               "pipeline.run_dir", "pipeline.export_dir"}


def test_every_field_has_a_bad_value() -> None:
    import dataclasses
    import inspect

    fields = {f"model.quant.{f.name}" for f in dataclasses.fields(BlockQuantConfig)}
    fields |= {f"model.optim.{f.name}" for f in dataclasses.fields(OptimConfig)}
    fields |= {f"pipeline.{f.name}" for f in dataclasses.fields(PipelineConfig)}
    fields |= {f"data.{name}" for name in inspect.signature(BlockActivationDataModule.__init__).parameters
               if name != "self"}
    assert set(BAD_FIELD_VALUES) | PATH_FIELDS == fields
    assert PATH_FIELDS == {field for field, _ in BAD_PATHS}


@pytest.mark.parametrize("field", list(BAD_FIELD_VALUES))
def test_every_field_out_of_range_is_one_line_exit_2_naming_it(workspace, capsys, field) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "bad_field")
    *sections, name = field.split(".")
    target = config
    for section in sections:
        target = target.setdefault(section, {})
    target[name] = BAD_FIELD_VALUES[field]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp, config, "bad_field"))])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and name in error_lines[0], error_lines
    assert not (tmp / "bad_field").exists()


def _file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _wikitext_dir_with(tmp: Path, name: str, split_file: str, content: bytes) -> Path:
    directory = tmp / name
    shutil.copytree(WIKITEXT_DIR, directory, dirs_exist_ok=True)
    (directory / split_file).chmod(0o644)
    (directory / split_file).write_bytes(content)
    return directory


NOT_UTF8 = b"caf\xe9 \xff\xfe lobster\n"
# Every path field the run reads or writes, given a missing, empty, unreadable and garbage target:
# (field, kind) -> (a target built under tmp, the message its one-line error must hold).
BAD_PATHS = {
    ("data.model", "missing"): (lambda tmp: str(tmp / "no_model"), "data.model: model path not found"),
    ("data.model", "missing-relative"): (lambda tmp: "no/such/model", "data.model: model path not found"),
    ("data.model", "empty"): (lambda tmp: str((tmp / "empty_model").mkdir(exist_ok=True) or tmp / "empty_model"),
                              "has no config.json"),
    ("data.model", "unreadable"): (lambda tmp: str(_file(tmp, "model.txt", b"weights")), "is a file but not a .gguf"),
    ("data.model", "garbage"): (lambda tmp: str(_file(tmp, "garbage_model/config.json", b"{not json").parent),
                                "config.json is not valid JSON"),
    ("data.gguf_file", "missing"): (lambda tmp: "absent.gguf", "gguf_file not found"),
    ("data.model", "wrong-kind"): (lambda tmp: str(_file(tmp, "bert/config.json", b'{"model_type": "bert"}').parent),
                                   "unsupported model_type 'bert'"),
    ("data.calibration", "missing"): (lambda tmp: str(tmp / "no.txt"), "data.calibration: text file not found"),
    ("data.calibration", "empty"): (lambda tmp: str(_file(tmp, "empty.txt", b" \n\n")), "empty.txt is empty"),
    ("data.calibration", "unreadable"): (lambda tmp: str(tmp), "data.calibration: text file not found"),
    ("data.calibration", "garbage"): (lambda tmp: str(_file(tmp, "latin1.txt", NOT_UTF8)), "is not UTF-8 text"),
    ("data.data_dir", "missing"): (lambda tmp: str(tmp / "no_dir"), "data.data_dir: directory not found"),
    ("data.data_dir", "empty"): (lambda tmp: str((tmp / "empty_dir").mkdir(exist_ok=True) or tmp / "empty_dir"),
                                 "wiki.valid.raw"),
    ("data.data_dir", "unreadable"): (lambda tmp: str(_file(tmp, "a_file", b"x")), "data.data_dir: directory not found"),
    ("data.data_dir", "garbage"): (lambda tmp: str(_wikitext_dir_with(tmp, "latin1_wiki", "wiki.valid.raw", NOT_UTF8)),
                                   "wiki.valid.raw is not UTF-8 text"),
    ("data.data_dir", "empty-test-split"): (lambda tmp: str(_wikitext_dir_with(tmp, "no_test", "wiki.test.raw", b"")),
                                            "wiki.test.raw is empty"),
    ("data.cache_dir", "unreadable"): (lambda tmp: str(_file(tmp, "cache_file", b"x") / "cache"), "cannot be created"),
    ("pipeline.run_dir", "unreadable"): (lambda tmp: str(_file(tmp, "run_file", b"x") / "run"), "cannot be created"),
    ("pipeline.export_dir", "unreadable"): (lambda tmp: str(_file(tmp, "export_file", b"x") / "q"),
                                            "cannot be created"),
}


@pytest.mark.parametrize("field,kind", list(BAD_PATHS), ids=lambda value: value)
def test_bad_path_is_one_line_exit_2_and_writes_nothing(workspace, capsys, tmp_path, field, kind) -> None:
    tmp, model_dir = workspace
    target, message = BAD_PATHS[field, kind]
    config = make_config(tmp, model_dir, "bad_path")
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    section, key = field.split(".")
    config[section][key] = target(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp_path, config, "bad_path"))])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines
    assert not (tmp / "bad_path").exists() and not (tmp_path / "cache").exists()


def test_rerun_with_other_trainer_settings_is_refused_and_the_record_kept(workspace, baseline, capsys) -> None:
    """A finished run rerun with another max_epochs once skipped every layer and rewrote config.yaml."""
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "baseline")
    run_dir = Path(config["pipeline"]["run_dir"])
    record = (run_dir / "config.yaml").read_text()
    config["trainer"]["max_epochs"] = 5
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp, config, "more_epochs"))])
    assert exit_info.value.code == 2
    assert "holds another run (differs in: trainer)" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == record
    config["trainer"]["enable_progress_bar"] = True  # cannot change the result: accepted
    config["trainer"]["max_epochs"] = baseline[0]["trainer"]["max_epochs"]
    main(["fit", "--config", str(write_config(tmp, config, "progress_bar"))])


def test_run_dir_of_another_run_is_refused(workspace, baseline, capsys) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "baseline")
    config["model"]["quant"] = {**QUANT, "w_bits": 3}
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp, config, "other"))])
    assert exit_info.value.code == 2
    assert "holds another run (differs in: quant)" in capsys.readouterr().err


def test_run_dir_trained_on_other_calibration_text_is_refused(workspace, baseline, capsys, tmp_path) -> None:
    """Same settings, other text (say, the generated fallback): the windows' hash tells them apart."""
    tmp, model_dir = workspace
    other_text = tmp_path / "wikitext"
    shutil.copytree(WIKITEXT_DIR, other_text)
    valid = other_text / "wiki.valid.raw"
    valid.chmod(0o644)
    valid.write_text("\n".join(reversed(valid.read_text().splitlines())) + "\n")
    config = make_config(tmp, model_dir, "baseline")
    config["data"]["data_dir"] = str(other_text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(tmp, config, "other_text"))])
    assert exit_info.value.code == 2
    assert "holds another run (differs in: windows_sha256)" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["path", "loaded"])
def test_quantize_verb_runs_the_same_pipeline_as_fit(workspace, baseline, source) -> None:
    """hh_lightning.quantize(model_or_path, recipe, ...) gives fit's model, from a path or a loaded model."""
    import hh_lightning
    from hh_lightning.models import load_model

    tmp, model_dir = workspace
    config, summary = baseline
    recipe = tmp / "baseline.yaml"  # written by the baseline fixture
    run_dir = tmp / f"api_{source}"
    if source == "path":
        model = hh_lightning.quantize(model_dir, recipe, run_dir=run_dir)
    else:
        loaded, tokenizer = load_model(str(model_dir))
        # Its cache fingerprint names another source, and the baseline's datamodule still reads tmp/cache.
        model = hh_lightning.quantize(loaded, recipe, tokenizer=tokenizer, run_dir=run_dir,
                                      overrides=[f"--data.cache_dir={tmp / 'cache_loaded'}"])
    assert_same_model(Path(config["pipeline"]["run_dir"]), run_dir)
    tokens = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(3))
    reference = load_quantized(Path(summary["export_dir"]))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, reference(tokens).logits, atol=1e-5)
    identity = json.loads((run_dir / "run.json").read_text())
    assert identity["model"] == (str(model_dir) if source == "path" else f"in-memory:{model_dir}")
    assert identity["weights_sha256"] == json.loads((Path(config["pipeline"]["run_dir"]) / "run.json").read_text())[
        "weights_sha256"]


def test_gptq_rounding_runs_end_to_end_and_reloads(workspace) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "gptq")
    config["model"]["quant"]["w_rounding"] = "gptq"
    config["data"]["cache_dir"] = str(tmp / "cache_gptq")
    summary = main(["fit", "--config", str(write_config(tmp, config, "gptq"))]).summary
    assert summary["quantized"]["ppl"] > 1
    model = load_quantized(Path(summary["export_dir"]))
    tokens = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_only_fit_is_offered(capsys, subcommand) -> None:
    """Lightning's validate/test/predict would run nothing useful on a layer-wise job, so only fit is offered."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _list_fields() -> set[str]:
    """Every field of the fit sections whose value is a list, and ``trainer.devices``."""
    import dataclasses
    import typing

    def is_list(hint) -> bool:
        return typing.get_origin(hint) is list or any(typing.get_origin(arg) is list for arg in typing.get_args(hint))

    fields = {f"pipeline.{f.name}" for f in dataclasses.fields(PipelineConfig)
              if is_list(typing.get_type_hints(PipelineConfig)[f.name])}
    for section, cls in (("model.quant", BlockQuantConfig), ("model.optim", OptimConfig)):
        fields |= {f"{section}.{name}" for name, hint in typing.get_type_hints(cls).items() if is_list(hint)}
    hints = typing.get_type_hints(BlockActivationDataModule.__init__)
    fields |= {f"data.{name}" for name, hint in hints.items() if name != "return" and is_list(hint)}
    return fields | {"trainer.devices"}


# A list with a repeated entry for every list field: each would be collapsed silently.
REPEATED_LISTS = {"pipeline.layers": [1, 1], "trainer.devices": [0, 0]}


def test_every_list_field_has_a_repeated_value() -> None:
    assert set(REPEATED_LISTS) == _list_fields()


@pytest.mark.parametrize("field", list(REPEATED_LISTS))
def test_a_list_field_with_a_repeat_is_refused(workspace, capsys, field) -> None:
    tmp, model_dir = workspace
    config = make_config(tmp, model_dir, "repeated", layer_parallel=True)
    section, name = field.split(".")
    config[section][name] = REPEATED_LISTS[field]
    _assert_refused(main, ["fit", "--config", str(write_config(tmp, config, "repeated"))], capsys,
                    f"{field}={REPEATED_LISTS[field]} repeats")
    assert not (tmp / "repeated").exists()


def _assert_refused(entry, args: list[str], capsys, message: str) -> str:
    """``entry(args)`` exits 2 with one ``error:`` line holding ``message``, no usage text and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        entry(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "usage" not in err and "Traceback" not in err, err
    return errors[0]


def _small_vocabulary_model(tmp: Path) -> str:
    """A model whose embedding has fewer rows than its tokenizer has tokens: not its tokenizer."""
    directory = tmp / "small_vocabulary"
    tiny_model("llama", vocab_size=100).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


# Sources a library would fail on only inside the cache build: (case) -> (data.model built under tmp, message).
BAD_SOURCES = {
    "an-export": (lambda tmp: str(save_tiny_export("hqq-w3-g16", tmp / "export")), "is an hh_lightning export"),
    "tokenizer-of-another-model": (_small_vocabulary_model, "the tokenizer has"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_a_bad_source_is_refused_before_the_cache_or_the_run_dir(workspace, capsys, tmp_path, case) -> None:
    tmp, model_dir = workspace
    build, message = BAD_SOURCES[case]
    config = make_config(tmp_path, build(tmp_path), "run")
    _assert_refused(main, ["fit", "--config", str(write_config(tmp_path, config, "source"))], capsys, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def _file_under(tmp: Path, name: str, content: bytes) -> str:
    return str(_file(tmp, name, content))


# What jsonargparse would answer with its usage text: (case) -> (extra args built under tmp, message).
BAD_FIT_ARGS = {
    "binary-config": (lambda tmp: ["--config", _file_under(tmp, "bin.yaml", bytes(range(256)))], "config: "),
    "malformed-config": (lambda tmp: ["--config", _file_under(tmp, "bad.yaml", b"trainer: [1\n")],
                         "is not valid YAML"),
    "unknown-config-key": (lambda tmp: ["--config", _file_under(tmp, "key.yaml", b"bogus: 1\n")], "bogus"),
    "ill-typed": (lambda tmp: ["--trainer.max_epochs", "two"], "trainer.max_epochs='two' is not"),
    "not-finite": (lambda tmp: ["--model.optim.lr_clips", "nan"], "model.optim.lr_clips=nan must be a finite"),
    "unknown-option": (lambda tmp: ["--model.quant.w_bitz", "3"], "--model.quant.w_bitz"),
    "not-a-list": (lambda tmp: ["--pipeline.layers", "3"], "pipeline.layers='3' is not a list"),
}


@pytest.mark.parametrize("case", list(BAD_FIT_ARGS))
def test_bad_arguments_are_one_line_without_usage_text(workspace, capsys, tmp_path, case) -> None:
    from hh_lightning.cli import entry

    tmp, model_dir = workspace
    build, message = BAD_FIT_ARGS[case]
    config = make_config(tmp_path, model_dir, "run")
    args = ["fit", "--config", str(write_config(tmp_path, config, "base")), *build(tmp_path)]
    _assert_refused(entry, args, capsys, message)
    assert not (tmp_path / "run").exists()


def test_a_fit_refused_for_a_cache_another_run_reads_claims_nothing(workspace, capsys, tmp_path) -> None:
    """The refusal once came after run.json was written, and a later fit there was refused as another run's."""
    tmp, model_dir = workspace
    config = make_config(tmp_path, model_dir, "run")
    config["data"]["cache_dir"] = str(tmp_path / "shared_cache")
    reader = BlockActivationDataModule(**{**config["data"], "seed": 7})
    reader.prepare_data()  # builds the cache for other settings and keeps reading it
    try:
        _assert_refused(main, ["fit", "--config", str(write_config(tmp_path, config, "conflict"))], capsys,
                        "is being read by another run")
    finally:
        reader._cache_reader.release()
    assert not (tmp_path / "run").exists()
