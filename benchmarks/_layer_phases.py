"""Child of ``calibration_speed.py --per-layer-overhead``: one real pipeline run, timed by phase.

Run as ``PYTHONPATH=TREE python benchmarks/_layer_phases.py --config C --run-dir D --layers 0,1,2
[--threads N]``, with ``TREE`` the source tree whose ``hh_lightning`` is timed (this checkout, or
a baseline extracted with ``git archive``), so nothing here imports ``hh_lightning`` at module level.

It builds the run the CLI builds (``cli.main(run=False)`` + ``quantization_run``), prepares the
activation cache and trains the layers in ``quantized`` input mode exactly as ``train.py fit`` does
(``train_sequential_quantized``), with the functions in ``PHASES`` wrapped in wall-clock timers.
Times are exclusive: a phase nested inside another is subtracted from its parent, so the phases
of one layer add up to its whole time (``train_layer`` plus the next layer's input). Functions a
tree does not have are skipped. The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from collections import defaultdict

# (module, attribute path, label, only inside this label or None). The first entry is the layer.
PHASES = [
    ("hh_lightning.pipeline", "QuantizationRun.train_layer", "other (Lightning loop, logging, gc)", None),
    ("hh_lightning.pipeline", "QuantizationRun._trainer", "Trainer construction", None),
    ("hh_lightning.module", "HHBlockModule.configure_model", "block build", None),
    ("hh_lightning.callbacks", "RotationInitCallback.on_train_start", "PCA init (statistics, eigh)", None),
    ("hh_lightning.callbacks", "WeightQuantizerInitCallback.on_train_start", "weight clip search", None),
    ("hh_lightning.module", "HHBlockModule.on_train_start", "initial validation MSE", None),
    ("lightning.pytorch.loops.optimization.automatic", "_AutomaticOptimization.run", "training steps", None),
    ("lightning.pytorch.loops.evaluation_loop", "_EvaluationLoop.run", "validation epochs (and sanity check)",
     None),
    ("lightning.pytorch.trainer.trainer", "Trainer.save_checkpoint", "checkpoints", None),
    ("hh_lightning.artifacts", "export_block", "export: validation MSEs, copy", None),
    ("hh_lightning.artifacts", "dataset_statistics", "export: GPTQ statistics pass", "export: validation MSEs, copy"),
    ("hh_lightning.block", "HHDecoderBlock.fold_", "export: fold (GPTQ codes)", "export: validation MSEs, copy"),
    ("hh_lightning.artifacts", "write_layer_artifact", "export: artifact write", None),
    ("hh_lightning.pipeline", "QuantizationRun.layer_done", "artifact checks (sha256)", None),
    ("hh_lightning.pipeline", "QuantizationRun._folded_block", "next layer's input: load folded block", None),
    ("hh_lightning.pipeline", "write_boundary_file", "next layer's input: run block, write", None),
]
LAYER_LABEL = PHASES[0][2]
STEPS_LABEL = "training steps"


class PhaseTimer:
    """Exclusive wall time per (layer, label); ``layer`` is the layer whose ``train_layer`` ran last."""

    def __init__(self) -> None:
        self.times: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.stack: list[list] = []  # [label, start, nested seconds]
        self.layer = -1

    def wrap(self, function, label: str, inside: str | None, is_layer: bool):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if inside is not None and (not self.stack or self.stack[-1][0] != inside):
                return function(*args, **kwargs)
            if is_layer:
                self.layer = args[1]
            frame = [label, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                self.stack.pop()
                elapsed = time.perf_counter() - frame[1]
                self.times[self.layer][label] += elapsed - frame[2]
                if self.stack:
                    self.stack[-1][2] += elapsed
        return timed

    def install(self) -> list[str]:
        """Wrap every phase the tree has; returns the labels installed."""
        installed = []
        for module_name in ("hh_lightning.callbacks", "hh_lightning.pipeline", "hh_lightning.artifacts"):
            importlib.import_module(module_name)  # loaded first, so their imported names are found
        for index, (module_name, path, label, inside) in enumerate(PHASES):
            owner = importlib.import_module(module_name)
            *parents, attribute = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent, None)
            if owner is None or not hasattr(owner, attribute):
                continue
            original = getattr(owner, attribute)
            wrapped = self.wrap(original, label, inside, index == 0)
            setattr(owner, attribute, wrapped)
            if not parents:  # a function: also where other modules imported it by name
                for other in list(sys.modules.values()):
                    if getattr(other, "__name__", "").startswith("hh_lightning") and \
                            getattr(other, attribute, None) is original:
                        setattr(other, attribute, wrapped)
            installed.append(label)
        return installed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--layers", required=True, help="comma-separated layer indices")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--override", action="append", default=[], help="extra train.py arguments")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from hh_lightning.cli import main as cli_main
    from hh_lightning.cli import quantization_run
    from hh_lightning.parallel import WorkerInfo

    timer = PhaseTimer()
    installed = timer.install()
    cli = cli_main(["--config", args.config, f"--pipeline.run_dir={args.run_dir}",
                    f"--pipeline.layers=[{args.layers}]", "--trainer.enable_progress_bar=false", *args.override],
                   run=False)
    run = quantization_run(cli)
    run.validate()
    run.prepare()
    start = time.perf_counter()
    run.train_sequential_quantized(WorkerInfo.single(run.trainer_kwargs))
    wall = time.perf_counter() - start
    layers = {str(layer): dict(phases) for layer, phases in timer.times.items()}
    print(json.dumps({"layers": layers, "installed": installed, "wall_s": wall,
                      "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
