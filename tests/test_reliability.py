"""What survives what: kills mid-cache and mid-export, corrupted artifacts, divergence, two runs at once, a full disk.

Every test runs ``train.py fit`` (``main``) on the tiny model of ``test_pipeline``
and, where a run completes, compares it with one uninterrupted baseline run.
Processes that are killed run ``main`` exactly as ``train.py`` does, with one
step slowed down (or held) so the kill lands inside that step every time
instead of racing a build that takes milliseconds on a tiny model.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_pipeline import CHILD_ENV, REPO, assert_same_model, make_config, write_config
from tiny_models import save_tiny_checkpoint

from hh_lightning import artifacts
from hh_lightning import cache as cache_module
from hh_lightning import module as module_module
from hh_lightning.cli import main
from hh_lightning.export import load_quantized
from hh_lightning.files import sha256_file
from hh_lightning.module import HHBlockModule

EPOCHS = 2  # 2 steps per epoch: enough for "a checkpoint, then more training"
# One thread per child: on 2 shared cores, more threads only spin and wait (about 20x slower).
POLL_SECONDS = 0.01
TIMEOUT_SECONDS = 300

# ``python -c`` body: ``train.py fit --config argv[1]`` after ``{patch}``.
CHILD = """
import os, sys, time
{patch}
from hh_lightning.cli import main
main(["fit", "--config", sys.argv[1]])
"""
# Each write of a cache batch takes 0.2 s more: the build lasts seconds, not milliseconds.
SLOW_CACHE_BUILD = """
import hh_lightning.cache as d
_write = d._BoundaryWriter.write
d._BoundaryWriter.write = lambda self, *a: (time.sleep(0.2), _write(self, *a))[1]
"""
# The export's weights are written, then it stalls before its metadata and the rename.
STALLED_EXPORT = """
import hh_lightning.export as e
_save = e.save_file
e.save_file = lambda *a, **k: (_save(*a, **k), time.sleep(600))[0]
"""
# The run claims run_dir (lock, run.json, config.yaml, cache), then stalls before training.
STALLED_TRAINING = """
import hh_lightning.pipeline as p
p.QuantizationRun.train_layers = lambda self, *a: time.sleep(600)
"""
# A cache-building child for the shared-cache test: marks when it reaches the build lock,
# and its writes wait for a "go" file, so the test decides when the build may finish.
CACHE_CHILD = """
import contextlib, json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO)
import hh_lightning.cache as d
from hh_lightning.datamodule import BlockActivationDataModule
ready, go = Path(sys.argv[2]), Path(sys.argv[3])
_lock, _write = d._build_lock, d._BoundaryWriter.write

@contextlib.contextmanager
def lock(cache_dir):
    ready.touch()
    with _lock(cache_dir):
        yield

def write(self, *args):
    while not go.exists():
        time.sleep(0.01)
    _write(self, *args)

d._build_lock, d._BoundaryWriter.write = lock, write
datamodule = BlockActivationDataModule(**json.loads(sys.argv[1]))
datamodule.prepare_data()
print(json.dumps({"build_id": datamodule.manifest.build_id}))
"""


# ------------------------------------------------------------------ helpers
CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_stray_children():
    """A failed test must not leave a stalled child (they sleep for minutes) behind."""
    yield
    while CHILDREN:
        process = CHILDREN.pop()
        if process.poll() is None:
            process.kill()
            process.wait()

def config_for(tmp: Path, model_dir: Path, name: str, **pipeline) -> dict:
    config = make_config(tmp, model_dir, name, **pipeline)
    config["trainer"]["max_epochs"] = EPOCHS
    return config


def start_child(tmp: Path, name: str, code: str, *args: str) -> subprocess.Popen:
    """``python -c code args...`` with its output in ``tmp/name.log`` (``child_output``)."""
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=CHILD_ENV,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    process.log_path = log_path
    CHILDREN.append(process)
    return process


def child_output(process: subprocess.Popen) -> str:
    return process.log_path.read_text(errors="replace")


def wait_until(processes: list[subprocess.Popen], condition: Callable[[], object], what: str) -> None:
    """Poll the file system every 10 ms until ``condition()`` holds; fail if a child ends first."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not condition():
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"a child ended (rc {process.returncode}) before {what}:\n"
                            f"{child_output(process)[-3000:]}")
        if time.monotonic() > deadline:
            for process in processes:
                process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def fit(path: Path) -> dict | None:
    return main(["fit", "--config", str(path)]).summary


def flip_byte(path: Path, offset: int | None = None) -> None:
    payload = bytearray(path.read_bytes())
    offset = len(payload) // 2 if offset is None else offset
    payload[offset] ^= 0x10
    path.write_bytes(bytes(payload))


def cache_files(cache_dir: Path) -> dict:
    return json.loads((cache_dir / "manifest.json").read_text())["files"]


def assert_export_equals(run_dir: Path, reference: Path) -> None:
    """``run_dir/quantized`` loads and computes what the reference export computes."""
    tokens = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = load_quantized(run_dir / "quantized")(tokens).logits
        expected = load_quantized(reference / "quantized")(tokens).logits
    assert torch.allclose(logits, expected, atol=1e-5)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    return tmp, save_tiny_checkpoint(tmp / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def baseline(workspace) -> Path:
    """One uninterrupted run (it also builds the shared cache ``tmp/cache``); returns its run_dir."""
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "baseline")
    fit(write_config(tmp, config, "baseline"))
    return Path(config["pipeline"]["run_dir"])


# -------------------------------------------------------------------- kills
def test_sigkill_during_cache_build_then_rerun_equals_uninterrupted(workspace, baseline) -> None:
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "killed_cache")
    cache = tmp / "cache_killed"
    config["data"]["cache_dir"] = str(cache)
    path = write_config(tmp, config, "killed_cache")
    run_dir = Path(config["pipeline"]["run_dir"])

    child = start_child(tmp, "killed_cache", CHILD.format(patch=SLOW_CACHE_BUILD), str(path))
    building = lambda: list(tmp.glob(".cache_killed.build-*/boundary_*.bin"))  # noqa: E731
    wait_until([child], building, "the cache build started")
    sigkill(child)
    build_dir = building()[0].parent
    assert build_dir.is_dir() and not (build_dir / "manifest.json").exists()
    assert not cache.exists(), "a half-built cache appeared under the final name"

    fit(path)
    assert not build_dir.exists(), "the killed build's directory was not cleaned up"
    assert cache_files(cache) == cache_files(tmp / "cache")  # byte-identical to an undisturbed build
    assert_same_model(baseline, run_dir)
    assert_export_equals(run_dir, baseline)


def test_sigkill_during_export_then_rerun_equals_uninterrupted(workspace, baseline) -> None:
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "killed_export")
    path = write_config(tmp, config, "killed_export")
    run_dir = Path(config["pipeline"]["run_dir"])

    child = start_child(tmp, "killed_export", CHILD.format(patch=STALLED_EXPORT), str(path))
    staged = lambda: list(run_dir.glob(".quantized.tmp-*/model.safetensors"))  # noqa: E731
    wait_until([child], staged, "the export started")
    sigkill(child)
    staging = staged()[0].parent
    assert not (run_dir / "quantized").exists(), "a partial export appeared under the final name"
    with pytest.raises(FileNotFoundError, match="quantization_config.json"):
        load_quantized(staging)  # the partial directory is not loadable as a model either

    fit(path)
    assert not staging.exists(), "the killed export's staging directory was not cleaned up"
    assert_same_model(baseline, run_dir)
    assert_export_equals(run_dir, baseline)


# --------------------------------------------------------------- corruption
def test_corrupted_layer_artifacts_are_detected_named_and_redone(workspace, baseline, caplog) -> None:
    """Layer 0 truncated (re-exported from its last.ckpt), layer 1 flipped with no checkpoint (retrained)."""
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "corrupted", keep_checkpoints=True)
    run_dir = Path(config["pipeline"]["run_dir"])
    fit(write_config(tmp, config, "corrupted"))  # the baseline's run, with its checkpoints kept
    layers = run_dir / "layers"
    with open(layers / "layer_000.safetensors", "r+b") as handle:
        handle.truncate(handle.seek(0, os.SEEK_END) - 1)
    flip_byte(layers / "layer_001.safetensors")
    shutil.rmtree(run_dir / "checkpoints" / "layer_001")

    with caplog.at_level(logging.INFO, logger="hh_lightning"):
        fit(write_config(tmp, config, "corrupted"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("layer_000.safetensors is missing or has the wrong size; layer 0 is trained again" in w
               for w in warnings), warnings
    assert any("layer_001.safetensors sha256" in w and "the file is corrupted or was edited; layer 1 is trained again"
               in w for w in warnings), warnings
    assert "layer 1 (2 of 2): training" in caplog.text  # from scratch: its checkpoint is gone
    assert_same_model(baseline, run_dir)
    assert_export_equals(run_dir, baseline)


def test_flipped_cache_byte_is_caught_with_verify_cache(workspace, baseline, caplog) -> None:
    """Sizes are checked on every run; sha256 with ``data.verify_cache`` (it reads the whole cache)."""
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "verify")
    cache = tmp / "cache_verify"
    shutil.copytree(tmp / "cache", cache)
    shutil.copytree(baseline, config["pipeline"]["run_dir"])  # layers done: this run only reopens the cache
    config["data"].update(cache_dir=str(cache), verify_cache=True)
    build_id = json.loads((cache / "manifest.json").read_text())["build_id"]
    flip_byte(cache / "boundary_001.bin")

    with caplog.at_level(logging.WARNING, logger="hh_lightning"):
        fit(write_config(tmp, config, "verify"))
    assert f"activation cache file {cache / 'boundary_001.bin'} fails its sha256 check" in caplog.text
    assert json.loads((cache / "manifest.json").read_text())["build_id"] != build_id  # rebuilt
    assert cache_files(cache) == cache_files(tmp / "cache")
    assert sha256_file(cache / "boundary_001.bin") == cache_files(cache)["boundary_001.bin"]["sha256"]


# ---------------------------------------------------------------- numerics
def test_nan_loss_stops_the_layer_keeps_its_checkpoint_and_exports_nothing(workspace, baseline,
                                                                          monkeypatch) -> None:
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "diverged")
    path = write_config(tmp, config, "diverged")
    run_dir = Path(config["pipeline"]["run_dir"])
    training_step = HHBlockModule.training_step

    def diverging_step(self, batch, batch_idx):
        if self.layer_index == 1 and self.global_step == 2:  # first step of epoch 1, after a checkpoint
            with torch.no_grad():
                for parameter in self.block.parameters():
                    if parameter.requires_grad:
                        parameter.fill_(float("nan"))
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(HHBlockModule, "training_step", diverging_step)
    with pytest.raises(FloatingPointError, match=r"^layer 1: loss is nan at step 2$"):
        fit(path)
    assert (run_dir / "layers" / "layer_000.json").is_file()
    assert not list((run_dir / "layers").glob("*layer_001*")), "the diverged layer was exported"
    assert not (run_dir / "quantized").exists() and not (run_dir / "summary.json").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "layer_001" / "last.ckpt", map_location="cpu",
                            weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())

    monkeypatch.setattr(HHBlockModule, "training_step", training_step)
    fit(path)  # resumes layer 1 from the kept epoch-0 checkpoint
    assert_same_model(baseline, run_dir)


def test_non_finite_validation_mse_is_not_exported(workspace, baseline, monkeypatch) -> None:
    """Training losses were finite, but the block measures non-finite in every state: the export refuses it.

    Every measurement is patched: the initial one (``on_train_start``), because a finite initial state
    would be a fallback and exported instead, and the trained one, which export takes from the last
    validation epoch (``shipped_val_mse``) or measures again.
    """
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "nan_val", layers=[0])
    run_dir = Path(config["pipeline"]["run_dir"])
    for owner in (artifacts, module_module):
        monkeypatch.setattr(owner, "block_mse", lambda *_: float("nan"))
    validation_end = module_module.HHBlockModule.on_validation_epoch_end

    def nan_validation_end(self) -> None:
        validation_end(self)
        self.shipped_val_mse = (*self.shipped_val_mse[:2], float("nan"))

    monkeypatch.setattr(module_module.HHBlockModule, "on_validation_epoch_end", nan_validation_end)
    with pytest.raises(FloatingPointError, match=r"^layer 0: validation MSE is nan; not exporting$"):
        fit(write_config(tmp, config, "nan_val"))
    assert not list((run_dir / "layers").glob("*layer_000*"))
    assert torch.load(run_dir / "checkpoints" / "layer_000" / "last.ckpt", weights_only=True)["epoch"] == EPOCHS - 1


def test_a_layer_that_training_makes_worse_exports_its_best_untrained_state(workspace, caplog) -> None:
    """An absurd learning rate wrecks the trained block: the export keeps the better of its initial and fixed
    states, and says so.

    With a learning rate of 0 the trained state is the initial one, so that fit weighs the same two
    untrained states: both runs must export the same one, measured the same.
    """
    tmp, model_dir = workspace
    runs = {}
    for name, lr in (("frozen", 0.0), ("wild", 1e3)):
        config = config_for(tmp, model_dir, name, layers=[0])
        config["model"]["optim"] = {"lr_transforms": lr, "lr_clips": lr}
        with caplog.at_level(logging.WARNING, logger="hh_lightning"):
            fit(write_config(tmp, config, name))
        runs[name] = Path(config["pipeline"]["run_dir"])
    frozen, wild = (json.loads((runs[n] / "layers" / "layer_000.json").read_text()) for n in ("frozen", "wild"))
    untrained = min(("initial", "fixed"), key=lambda state: wild[f"mse_{'init' if state == 'initial' else state}"])
    assert frozen["mse_trained"] == pytest.approx(frozen["mse_init"], rel=1e-6)
    assert frozen["kept"] in ("trained", "fixed") and frozen["mse_final"] == min(frozen["mse_trained"],
                                                                                 frozen["mse_fixed"])
    assert wild["kept"] == untrained and wild["mse_trained"] > wild["mse_final"]
    assert wild["mse_final"] == pytest.approx(frozen["mse_final"], rel=1e-6)
    assert f"layer 0: training raised the held-out block MSE above the {untrained} state's" in caplog.text
    assert_same_model(runs["frozen"], runs["wild"])
    assert f"their {untrained} state was exported instead" in (runs["wild"] / "summary.md").read_text()


def test_the_initial_state_survives_a_checkpoint_round_trip() -> None:
    """A resumed fit never runs on_train_start's init, so the state to fall back on comes from the checkpoint."""
    source = HHBlockModule(layer_index=0)
    source.initial_state = {"block.r.v": torch.arange(4.0)}
    checkpoint: dict = {}
    source.on_save_checkpoint(checkpoint)
    resumed = HHBlockModule(layer_index=0)
    resumed.on_load_checkpoint(torch.load(_saved(checkpoint), weights_only=True))
    assert resumed.initial_state.keys() == {"block.r.v"}
    assert torch.equal(resumed.initial_state["block.r.v"], torch.arange(4.0))
    HHBlockModule(layer_index=0).on_load_checkpoint({})  # an older checkpoint without it still loads


def _saved(obj: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# -------------------------------------------------------------- concurrency
def test_second_run_on_a_run_dir_is_refused_until_the_first_dies(workspace, baseline, capsys) -> None:
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "locked")
    path = write_config(tmp, config, "locked")
    run_dir = Path(config["pipeline"]["run_dir"])
    holder = start_child(tmp, "locked", CHILD.format(patch=STALLED_TRAINING), str(path))
    lock = run_dir / ".lock"
    wait_until([holder], lambda: (run_dir / "config.yaml").is_file() and lock.is_file()
               and lock.read_text().strip() == str(holder.pid), "the first run claimed run_dir")
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}

    with pytest.raises(SystemExit) as exit_info:
        fit(path)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert f"pipeline.run_dir {run_dir} is in use by another run (pid {holder.pid}" in errors[0]
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")} == before

    sigkill(holder)  # the kernel drops a dead holder's lock: no stale lock to clear by hand
    fit(path)
    assert_same_model(baseline, run_dir)


def test_two_processes_building_one_cache_build_it_once(workspace, baseline) -> None:
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, "unused")
    cache = tmp / "cache_shared"
    settings = json.dumps({**config["data"], "cache_dir": str(cache)})
    go = tmp / "cache_shared.go"
    ready = [tmp / f"cache_shared.ready{i}" for i in range(2)]
    children = [start_child(tmp, f"cache_shared{i}", CACHE_CHILD, settings, str(ready[i]), str(go))
                for i in range(2)]
    # Both at the lock while one of them is building (its writes wait for "go"): they overlap.
    wait_until(children, lambda: all(r.exists() for r in ready) and list(tmp.glob(".cache_shared.build-*")),
               "both processes reached the cache")
    go.touch()
    outputs = []
    for child in children:
        assert child.wait(TIMEOUT_SECONDS) == 0, child_output(child)[-3000:]
        outputs.append(child_output(child))
    build_ids = [json.loads(line)["build_id"] for output in outputs for line in output.splitlines()
                 if line.startswith('{"build_id"')]
    assert len(build_ids) == 2 and len(set(build_ids)) == 1, "the second process did not reuse the cache"
    assert sum(output.count("activation cache built at") for output in outputs) == 1
    assert cache_files(cache) == cache_files(tmp / "cache")  # no interleaved writes
    assert not list(tmp.glob(".cache_shared.build-*")) and not list(tmp.glob(".cache_shared.stale-*"))


# ---------------------------------------------------------------- full disk
@pytest.mark.parametrize("where", ["write", "preallocate"])
def test_disk_full_during_cache_build_says_so_and_leaves_no_cache(workspace, monkeypatch, where) -> None:
    tmp, model_dir = workspace
    config = config_for(tmp, model_dir, f"full_{where}")
    cache = tmp / f"cache_full_{where}"
    config["data"]["cache_dir"] = str(cache)

    def no_space(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "write":  # mid-build, after some batches are written
        write, calls = cache_module._BoundaryWriter.write, []

        def failing_write(self, *args):
            calls.append(args)
            if len(calls) == 4:
                no_space()
            write(self, *args)

        monkeypatch.setattr(cache_module._BoundaryWriter, "write", failing_write)
    else:  # reserving the files' blocks, before any forward pass
        monkeypatch.setattr(os, "posix_fallocate", no_space)

    with pytest.raises(OSError) as error_info:
        fit(write_config(tmp, config, f"full_{where}"))
    assert error_info.value.errno == errno.ENOSPC
    message = str(error_info.value)
    assert "disk full while building the activation cache" in message and str(cache) in message
    assert not cache.exists()
    assert not list(tmp.glob(f".{cache.name}.*-*")), "a temporary build directory was left behind"
