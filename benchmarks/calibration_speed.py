"""Calibration (training-step) speed of one W4A4 ``HHBlockModule`` against a plain fp32 layer step.

For block shapes built from configs in code with random weights (no downloads):

* ``smollm2-135m``: Llama config, hidden 576, intermediate 1536, 9 heads, 3 KV heads, head_dim 64;
* ``qwen2.5-0.5b``: Qwen2 config, hidden 896, intermediate 4864, 14 heads, 2 KV heads, head_dim 64;
* ``qwen2.5-7b`` (only when named in ``--models``): Qwen2 config, hidden 3584, intermediate
  18944, 28 heads, 4 KV heads, head_dim 128;

it times, on the same random batch ``x`` of ``--batch × --seq-len`` hidden states (fp32):

* ``wrapped``: one calibration step of ``HHBlockModule``. Without ``--config``, with the default
  ``BlockQuantConfig`` (W4 per-channel symmetric with learnable clips, A4 per-token asymmetric
  with learnable clips, 64 reflections for R_qkv / R_upgate / R_down, head-dim R_o folded), in
  fp32, at batch 4 × 256; with ``--config RECIPE.yaml``, with that recipe's ``model.quant``,
  ``model.optim``, ``trainer.precision`` (``bf16-mixed``: the forward under bf16 autocast, as
  Lightning runs it) and ``data.batch_size`` × ``data.seq_len`` (``--batch`` / ``--seq-len``
  override them). The module is driven
  **without a Trainer**: ``attach_source`` + ``configure_model()``, then the rotations are
  PCA-initialized (``block.init_rotations_pca_(block.collect_statistics(x))``) and the weight
  quantizers clip-searched (``block.initialize_weight_quantizers()``), as the callbacks do. The
  optimizer is built like ``configure_optimizers`` (AdamW, transforms / clips groups, cosine
  ``LambdaLR``). A step is ``module.training_step((x, y), i)`` (forward, MSE against the FP
  layer's output ``y``, the finiteness check; ``self.log`` is a no-op without a Trainer),
  ``loss.backward()``, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad``.
* ``fp``: the unwrapped transformers decoder layer, all its parameters trained: RoPE and the
  causal mask computed from the model's own modules, forward, MSE against ``y``, backward,
  AdamW step, ``zero_grad``.

``ratio`` = wrapped / fp step time (the project's goal is ≤ 1.5). ``tokens/s`` is calibration
tokens per second of the wrapped step (``batch·seq / step``). With ``--ablation`` it also
times the wrapped step with every quantizer bypassed (``quantization_disabled``: rotations
only), so ``wrapped - no-quant`` is the fake quantizers' share. With ``--profile-steps N`` a
``torch.profiler`` run over N wrapped steps is summarized by op family (self time) and by the
forward ranges of rotations, weight / activation quantizers (record_function wrappers added
here at run time; the core modules are not changed).

``step peak GiB`` is the peak memory of one more wrapped step, taken after the plain step's
gradients and AdamW state are dropped, so it holds what the pipeline holds while it trains a
layer: the FP layer, the wrapped block, its optimizer state and the step's activations.
``fold peak GiB`` (with ``--estimate``) is the peak of the statistics pass and the GPTQ fold,
whose float64 Hessians dominate at 7B shapes. On CUDA both are ``torch.cuda.max_memory_allocated``
since a reset; on the CPU, the process's peak RSS (``VmHWM``) since Linux's ``clear_refs``
reset it, so they include the Python and torch runtime.

``--estimate`` (with ``--config``) extrapolates a whole model's calibration at the recipe's
sizes from what it measures on the one block: ``init`` (PCA init and clip search), the median
``forward`` (no gradient) of the wrapped block on the batch, and the GPTQ ``fold`` (statistics
from the batch; the fold's cost depends on the shapes, not on the values). Per layer, with
``B = ceil(data.n_samples / batch)`` batches, ``V = ceil(data.val_samples / batch)`` and
``E = trainer.max_epochs``::

    layer = E·B·step + init + fold + forward·(2B + (E + 1)·V)

(the statistics pass and the pass that writes the next layer's inputs, then the validation
before training and after each epoch), times the model's layer count. Not counted: building the
activation cache (one FP pass of the model) and the final evaluation.

Times are medians (``median_time``) of ``--repeats`` calls after ``--warmup``; on a shared
machine compare ratios, not absolute times.

Run: ``python benchmarks/calibration_speed.py [--batch 4] [--seq-len 256] [--threads 2]
[--models smollm2-135m qwen2.5-0.5b qwen2.5-7b] [--device cpu|cuda] [--config RECIPE.yaml
[--estimate]] [--compile default|reduce-overhead|...]`` (``--compile`` sets ``model.optim.compile``: the
wrapped step through ``torch.compile``)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import gc
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (  # noqa: E402
    machine_info,
    median_time,
    print_markdown_table,
    synchronized,
    write_json_atomic,
)
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402

from hh_lightning.block import BlockQuantConfig  # noqa: E402
from hh_lightning.linear import HHLinear  # noqa: E402
from hh_lightning.module import COMPILE_MODES, HHBlockModule, OptimConfig, cosine_factor  # noqa: E402
from hh_lightning.quantizers import (  # noqa: E402
    ActivationQuantizer,
    WeightQuantizer,
    quantization_disabled,
)
from hh_lightning.rotation import HouseholderRotation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "calibration_speed.json"
OVERHEAD_JSON = REPO / "benchmarks" / "results" / "layer_overhead.json"

# Block shapes of the target models (one layer; a tiny vocabulary since only the layer runs).
SHAPES = {
    "smollm2-135m": (LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                       num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                       rope_theta=100000.0)),
    "qwen2.5-0.5b": (Qwen2Config, dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                       num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                     num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                                     rope_theta=1000000.0)),
}
# Decoder layers of each whole model: what --estimate multiplies one layer's time by.
MODEL_LAYERS = {"smollm2-135m": 30, "qwen2.5-0.5b": 24, "qwen2.5-7b": 28}
DEFAULT_MODELS = ["smollm2-135m", "qwen2.5-0.5b"]
# The README table's setting, used without --config: 64 PCA-initialized plain Householder
# reflections, fp32, batch 4 x 256.
DEFAULT_QUANT = dict(rotation_structure="householder", qkv_reflections=64, upgate_reflections=64,
                     down_reflections=64)
DEFAULT_BATCH, DEFAULT_SEQ_LEN = 4, 256
AUTOCAST_DTYPES = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=None,
                        help=f"sequences per calibration step (default: --config's, else {DEFAULT_BATCH})")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per sequence (default: --config's, else {DEFAULT_SEQ_LEN})")
    parser.add_argument("--config", type=Path, default=None,
                        help="recipe YAML: the step's model.quant/optim, trainer.precision and data sizes "
                             "(default: the README table's 64-reflection fp32 setting); with "
                             "--per-layer-overhead, the recipe train.py runs (default configs/demo.yaml)")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES,
                        help="model.optim.compile for the wrapped step (default: --config's, else none)")
    parser.add_argument("--estimate", action="store_true",
                        help="also time a forward and the GPTQ fold, and extrapolate the whole model's "
                             "calibration at --config's sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the wrapped step with all quantizers bypassed")
    parser.add_argument("--profile-steps", type=int, default=2,
                        help="wrapped steps under torch.profiler (0: no profile)")
    parser.add_argument("--profile-top", type=int, default=8, help="ops listed in the profile summary")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--vocab-size", type=int, default=128, help="unused by the layer; kept tiny")
    parser.add_argument("--input-std", type=float, default=1.0, help="std of the random hidden states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None,
                        help=f"default {DEFAULT_JSON.name}, {OVERHEAD_JSON.name} with --per-layer-overhead")
    overhead = parser.add_argument_group("per-layer overhead (a real pipeline run, timed by phase)")
    overhead.add_argument("--per-layer-overhead", action="store_true",
                          help="time each phase of a layer's fit in train.py's own pipeline instead")
    overhead.add_argument("--layers", default="0,1,2", help="comma-separated layers quantized per run")
    overhead.add_argument("--baseline-ref", default=None,
                          help="git ref whose hh_lightning is timed too, alternating with this tree's")
    overhead.add_argument("--rounds", type=int, default=2, help="runs per tree (ABBA order with a baseline)")
    overhead.add_argument("--override", action="append", default=[], help="extra train.py argument (repeatable)")
    overhead.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per pipeline run")
    args = parser.parse_args()
    if args.config is not None and not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.estimate and (args.config is None or args.per_layer_overhead):
        parser.error("--estimate extrapolates a recipe's sizes: give it --config RECIPE.yaml "
                     "(and not --per-layer-overhead)")
    for name in ("batch", "seq_len", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.per_layer_overhead and args.config is None:
        args.config = REPO / "configs" / "demo.yaml"
    return args


def step_recipe(args: argparse.Namespace) -> tuple[BlockQuantConfig, OptimConfig, dict[str, Any]]:
    """The step's quantization and optimizer settings, and its sizes: ``batch``, ``seq_len``,
    ``autocast`` (a dtype or ``None``), and for ``--estimate`` the recipe's ``samples``,
    ``val_samples`` and ``epochs``. Raises ``SystemExit`` with one line on a recipe it cannot read."""
    import yaml

    if args.config is None:
        quant, optim, sizes = BlockQuantConfig(**DEFAULT_QUANT), OptimConfig(), {
            "batch": DEFAULT_BATCH, "seq_len": DEFAULT_SEQ_LEN, "autocast": None}
    else:
        try:
            recipe = yaml.safe_load(args.config.read_text()) or {}
            if not isinstance(recipe, dict):
                raise ValueError("not a recipe: a mapping with trainer, model and data sections")
            model, data, trainer = recipe.get("model", {}), recipe.get("data", {}), recipe.get("trainer", {})
            quant = BlockQuantConfig.from_dict(model.get("quant", {}))
            optim = OptimConfig(**model.get("optim", {}))
            precision = str(trainer.get("precision", "32-true"))
            if precision not in AUTOCAST_DTYPES:
                raise ValueError(f"trainer.precision={precision!r} is not one of {sorted(AUTOCAST_DTYPES)}")
            sizes = {"batch": int(data.get("batch_size", DEFAULT_BATCH)),
                     "seq_len": int(data.get("seq_len", DEFAULT_SEQ_LEN)),
                     "autocast": AUTOCAST_DTYPES[precision]}
            if args.estimate:
                for section, field in (("data", "n_samples"), ("trainer", "max_epochs")):
                    if field not in recipe.get(section, {}):
                        raise ValueError(f"--estimate needs {section}.{field}")
                sizes.update(samples=int(data["n_samples"]), val_samples=int(data.get("val_samples", 0)),
                             epochs=int(trainer["max_epochs"]))
        except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError) as error:
            message = " ".join(str(error).split())  # YAML's errors span lines
            raise SystemExit(f"error: --config {args.config}: {message}") from None
    sizes["batch"] = args.batch or sizes["batch"]
    sizes["seq_len"] = args.seq_len or sizes["seq_len"]
    if args.compile is not None:
        optim = replace(optim, compile=args.compile)
    return quant, optim, sizes


def autocast(device: str, dtype: torch.dtype | None):
    """The forward's precision context: ``dtype`` autocast (Lightning's ``*-mixed``), or none."""
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or on the CPU the process's peak RSS (Linux's
    ``clear_refs``), after a garbage collection so that freed phases do not linger."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: str) -> float:
    """The peak since ``reset_peak_memory``: CUDA's allocated bytes, or the CPU process's RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 2**20


def whole_model_estimate(sizes: dict[str, Any], layers: int, step_s: float, init_s: float,
                         forward_s: float, fold_s: float) -> dict[str, float]:
    """One layer's calibration time at the recipe's sizes, and the whole model's (module docstring)."""
    batches = math.ceil(sizes["samples"] / sizes["batch"])
    val_batches = math.ceil(sizes["val_samples"] / sizes["batch"])
    steps = sizes["epochs"] * batches
    setup_s = init_s + fold_s + forward_s * (2 * batches + (sizes["epochs"] + 1) * val_batches)
    layer_s = steps * step_s + setup_s
    return {"steps per layer": steps, "setup s per layer (est.)": setup_s, "layer s (est.)": layer_s,
            "whole model h (est.)": layers * layer_s / 3600}


def forward_and_fold_times(module: HHBlockModule, x: torch.Tensor, dtype: torch.dtype | None,
                           args: argparse.Namespace) -> tuple[float, float, float]:
    """The median no-gradient forward of the wrapped block on ``x`` (under ``dtype`` autocast), the
    time of folding it (GPTQ from ``x``'s statistics where the recipe rounds with it), and the
    peak memory of the fold (statistics included)."""
    @torch.no_grad()
    def forward() -> torch.Tensor:
        with autocast(args.device, dtype):
            return module(x)

    forward_s = median_time(synchronized(forward, args.device), repeats=args.repeats, warmup=1)
    block = module.block
    reset_peak_memory(args.device)
    statistics = block.collect_statistics(x) if block.quant.w_rounding == "gptq" else None
    start = time.perf_counter()
    synchronized(lambda: block.fold_(statistics), args.device)()
    return forward_s, time.perf_counter() - start, peak_memory_gib(args.device)


def shape_config(name: str, args: argparse.Namespace):
    """The one-layer transformers config of the named shape."""
    config_class, sizes = SHAPES[name]
    config = config_class(**sizes, num_hidden_layers=1, vocab_size=args.vocab_size,
                          max_position_embeddings=max(args.seq_len, 2048), tie_word_embeddings=True)
    config._attn_implementation = args.attn_implementation
    return config


def build_source(name: str, args: argparse.Namespace):
    """A one-layer random model of the named shape; returns (layer, config, rotary_emb)."""
    config = shape_config(name, args)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # non-trivial norms and biases, as in tests/tiny_models.py
        for param_name, parameter in model.named_parameters():
            if param_name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif param_name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    model.to(args.device)
    return model.model.layers[0], config, model.model.rotary_emb


def fp_step_fn(layer, config, rotary_emb, x, y, optim: OptimConfig, dtype: torch.dtype | None = None):
    """Plain step of the transformers layer, every parameter trained; its forward under ``dtype``
    autocast when given (fp32 weights and optimizer either way)."""
    layer.train()
    for parameter in layer.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=optim.lr_transforms, betas=optim.betas,
                                  weight_decay=optim.weight_decay)

    def step():
        position_ids = torch.arange(x.shape[1], device=x.device)[None]
        position_embeddings = rotary_emb(x, position_ids)
        mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None,
                                  past_key_values=None, position_ids=position_ids)
        with autocast(x.device.type, dtype):
            out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
            out = out[0] if isinstance(out, tuple) else out
            loss = F.mse_loss(out.float(), y.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def wrapped_module(layer, config, rotary_emb, x, quant: BlockQuantConfig, optim: OptimConfig):
    """An initialized HHBlockModule (PCA rotations, clip-searched weights) and its init time."""
    module = HHBlockModule(quant=quant, optim=optim, layer_index=0)
    module.attach_source(layer, config, rotary_emb)
    start = time.perf_counter()
    module.configure_model()
    module.to(x.device)
    block = module.block
    block.init_rotations_pca_(block.collect_statistics(x))
    block.initialize_weight_quantizers()
    return module, time.perf_counter() - start


def wrapped_step_fn(module: HHBlockModule, x, y, total_steps: int, dtype: torch.dtype | None = None):
    """One calibration step the way Lightning's automatic optimization runs it (no Trainer): the
    training step under ``dtype`` autocast when given, as Lightning's ``*-mixed`` precision does."""
    optim = module.optim
    optimizer = optim.optimizer(module.block.parameter_groups())
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total_steps, optim.min_lr_ratio))
    counter = [0]

    def step():
        with autocast(x.device.type, dtype):
            loss = module.training_step((x, y), counter[0])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        counter[0] += 1
    return step


# ------------------------------------------------------------------ profiling
RANGES = {
    "hh::rotation (fwd, incl. weight rotations)": [(HouseholderRotation, "rotate"),
                                                   (HouseholderRotation, "rotate_transposed")],
    "hh::weight fake-quant (fwd)": [(WeightQuantizer, "forward")],
    "hh::activation fake-quant (fwd)": [(ActivationQuantizer, "forward")],
    "hh::transformed_weight (fwd, W R per step)": [(HHLinear, "transformed_weight")],
}
OP_FAMILIES = [
    ("triangular solve (rotations)", re.compile(r"solve_triangular|SolveTriangular|trsm", re.I)),
    ("GEMM (mm/addmm/bmm/linear)", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|_?linear|matmul)$")),
    ("attention kernel", re.compile(r"attention|sdpa|flash", re.I)),
    ("min/max reductions (quant ranges)", re.compile(r"^aten::(amax|amin|max|min|aminmax)$")),
    ("round/clamp (fake quant)", re.compile(r"^aten::(round|clamp|clamp_min|clamp_max|clip)_?$")),
]


def install_ranges() -> list:
    """Wrap the rotation / quantizer methods in record_function ranges (class-level, this process
    only); returns what ``uninstall_ranges`` needs to undo it."""
    saved = []  # Rotation.forward calls self.rotate, so wrapping rotate covers forward too
    for label, targets in RANGES.items():
        for cls, attr in targets:
            original = cls.__dict__[attr]
            saved.append((cls, attr, original))

            @functools.wraps(original)
            def wrapper(self, *a, __original=original, __label=label, **kw):
                with torch.profiler.record_function(__label):
                    return __original(self, *a, **kw)
            setattr(cls, attr, wrapper)
    return saved


def uninstall_ranges(saved: list) -> None:
    for cls, attr, original in reversed(saved):
        setattr(cls, attr, original)


def profile_summary(step, steps: int, device: str, top: int) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.startswith("cuda")
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    self_attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total_attr = "device_time_total" if cuda else "cpu_time_total"
    self_total = sum(getattr(e, self_attr) for e in events) or 1.0
    families = {name: 0.0 for name, _ in OP_FAMILIES}
    families["other (elementwise, copies, …)"] = 0.0
    for event in events:
        if event.key.startswith("hh::") or event.key.startswith("Optimizer"):
            continue
        for name, pattern in OP_FAMILIES:
            if pattern.search(event.key):
                families[name] += getattr(event, self_attr)
                break
        else:
            families["other (elementwise, copies, …)"] += getattr(event, self_attr)
    per_step_ms = lambda us: us / 1000.0 / steps  # noqa: E731
    ranges = {e.key: per_step_ms(getattr(e, total_attr)) for e in events
              if e.key.startswith("hh::") or e.key.startswith("Optimizer.step")}
    ops = sorted(events, key=lambda e: getattr(e, self_attr), reverse=True)
    top_ops = [{"op": e.key, "self ms/step": per_step_ms(getattr(e, self_attr)),
                "share": getattr(e, self_attr) / self_total} for e in ops
               if not e.key.startswith("hh::")][:top]
    return {"self_time_ms_per_step": per_step_ms(self_total),
            "families": {k: {"ms/step": per_step_ms(v), "share": v / self_total} for k, v in families.items()},
            "forward_ranges_ms_per_step": ranges, "top_ops": top_ops}


# ------------------------------------------------------------------ per-layer overhead
def extract_tree(ref: str, directory: Path) -> Path:
    """``hh_lightning`` (and ``configs``) of git ``ref``, extracted under ``directory``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "hh_lightning", "configs"],
                             stdout=subprocess.PIPE, check=True).stdout
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def phase_run(tree: Path, args: argparse.Namespace, run_dir: Path) -> dict:
    """One ``_layer_phases.py`` run of ``tree``'s pipeline (a fresh process); its JSON result."""
    command = [sys.executable, str(REPO / "benchmarks" / "_layer_phases.py"), "--config", str(args.config),
               "--run-dir", str(run_dir), "--layers", args.layers, "--threads", str(args.threads)]
    command += [f"--override={value}" for value in args.override]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, timeout=args.child_timeout)
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{command} exited with code {done.returncode}")
    return json.loads(lines[-1])


def layer_totals(phases: dict[str, float]) -> dict[str, float]:
    """A layer's whole time, its training steps, and the rest."""
    from _layer_phases import STEPS_LABEL

    total = sum(phases.values())
    return {"layer total s": total, "training steps s": phases.get(STEPS_LABEL, 0.0),
            "outside the steps s": total - phases.get(STEPS_LABEL, 0.0)}


def per_layer_overhead(args: argparse.Namespace) -> None:
    """Time each phase of a layer's fit; with ``--baseline-ref``, the baseline's too, in ABBA order."""
    from _layer_phases import PHASES

    trees = {"this tree": REPO}
    with tempfile.TemporaryDirectory(prefix="layer_overhead_") as scratch:
        scratch = Path(scratch)
        if args.baseline_ref:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline_ref],
                                    stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
            trees = {f"before ({commit})": extract_tree(commit, scratch / "baseline"),
                     "after (this tree)": REPO}
        names = list(trees)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            for name in names if round_index % 2 == 0 else names[::-1]:
                print(f"[layer overhead] round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr,
                      flush=True)
                runs[name].append(phase_run(trees[name], args, scratch / f"run_{round_index}_{len(runs[name])}"))
    # Every layer of every run is one sample; the table shows per-layer medians.
    samples = {name: [phases for run in runs[name] for phases in run["layers"].values()] for name in names}
    labels = [label for _, _, label, _ in PHASES]
    medians = {name: {label: statistics.median(p.get(label, 0.0) for p in samples[name]) for label in labels}
               for name in names}
    totals = {name: {key: statistics.median(layer_totals(p)[key] for p in samples[name])
                     for key in layer_totals({})} for name in names}
    rows = [{"phase": label, **{f"{name} s": medians[name][label] for name in names}} for label in labels
            if any(medians[name][label] > 0 for name in names)]
    rows += [{"phase": f"**{key[:-2]}**", **{f"{name} s": totals[name][key] for name in names}}
             for key in totals[names[0]]]
    print(f"\nPer-layer time by phase, {args.config} layers [{args.layers}] in quantized input mode "
          f"(train.py's pipeline), {args.threads} threads: median over {len(samples[names[-1]])} layer samples "
          f"({args.rounds} runs per tree), exclusive wall seconds.\n")
    print_markdown_table(rows)
    path = args.json or OVERHEAD_JSON
    write_json_atomic(path, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(),
                             "medians": medians, "totals": totals, "runs": runs})
    print(f"\nwrote {path}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.per_layer_overhead:
        per_layer_overhead(args)
        return
    args.json = args.json or DEFAULT_JSON
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*trainer.*")
    quant, optim, sizes = step_recipe(args)
    args.batch, args.seq_len = sizes["batch"], sizes["seq_len"]
    dtype = sizes["autocast"]
    for name in args.models:  # a setting the shape cannot take: one line before any block is built
        try:
            quant.validate(shape_config(name, args))
            optim.validate()
        except ValueError as error:
            raise SystemExit(f"error: --config {args.config} on {name}: {error}") from None
    tokens = args.batch * args.seq_len
    rows, results = [], {}
    for name in args.models:
        layer, config, rotary_emb = build_source(name, args)
        generator = torch.Generator().manual_seed(args.seed + 1)
        x = (args.input_std * torch.randn(args.batch, args.seq_len, config.hidden_size,
                                          generator=generator)).to(args.device)
        with torch.no_grad():
            position_ids = torch.arange(args.seq_len, device=x.device)[None]
            mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None,
                                      past_key_values=None, position_ids=position_ids)
            out = layer.eval()(x, attention_mask=mask, position_ids=position_ids,
                               position_embeddings=rotary_emb(x, position_ids))
            y = (out[0] if isinstance(out, tuple) else out).detach().clone()

        module, init_s = wrapped_module(layer, config, rotary_emb, x, quant, optim)
        total_steps = args.warmup + args.repeats
        wrapped = synchronized(wrapped_step_fn(module, x, y, total_steps * 3 + args.profile_steps, dtype),
                               args.device)
        fp = synchronized(fp_step_fn(layer, config, rotary_emb, x, y, optim, dtype), args.device)
        # Alternate fp / wrapped / fp so both see the same background load; fp is the mean of two medians.
        fp_a = median_time(fp, repeats=args.repeats, warmup=args.warmup)
        wrapped_s = median_time(wrapped, repeats=args.repeats, warmup=args.warmup)
        fp_b = median_time(fp, repeats=args.repeats, warmup=0)
        fp_s = (fp_a + fp_b) / 2
        noquant_s = None
        if args.ablation:
            with quantization_disabled(module.block):
                noquant_s = median_time(wrapped, repeats=args.repeats, warmup=args.warmup)
        row = {"block": name, "tokens/step": tokens, "fp step s": fp_s, "wrapped step s": wrapped_s,
               "ratio": wrapped_s / fp_s, "tokens/s (wrapped)": tokens / wrapped_s,
               "tokens/s (fp)": tokens / fp_s}
        if noquant_s is not None:
            row["wrapped, quantizers off s"] = noquant_s
            row["fake-quant share"] = (wrapped_s - noquant_s) / wrapped_s
        row["init s (PCA + clip search)"] = init_s
        profile = None
        if args.profile_steps > 0:  # the same initialized module, a few more steps
            saved = install_ranges()
            try:
                profile = profile_summary(wrapped, args.profile_steps, args.device, args.profile_top)
            finally:
                uninstall_ranges(saved)
        # The calibration step's memory as the pipeline holds it: the FP layer, the block and its
        # optimizer, without the plain step's gradients and AdamW state.
        del fp
        layer.zero_grad(set_to_none=True)
        reset_peak_memory(args.device)
        wrapped()
        row["step peak GiB"] = peak_memory_gib(args.device)
        if args.estimate:  # last: the fold replaces the block's linears
            forward_s, fold_s, row["fold peak GiB"] = forward_and_fold_times(module, x, dtype, args)
            row.update({"forward s": forward_s, "fold s": fold_s,
                        **whole_model_estimate(sizes, MODEL_LAYERS[name], wrapped_s, init_s, forward_s, fold_s)})
        rows.append(row)
        results[name] = {"row": row, "profile": profile, "fp_step_s_runs": [fp_a, fp_b],
                         "trainable_params_wrapped": sum(p.numel() for p in module.block.parameters()
                                                         if p.requires_grad),
                         "trainable_params_fp": sum(p.numel() for p in layer.parameters())}
        del layer, module, x, y, wrapped
    precision = "fp32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
    print(f"\nCalibration step, batch {args.batch} × seq {args.seq_len}, {precision}, device {args.device}, "
          f"threads {args.threads} (median of {args.repeats}), recipe {args.config or 'README table setting'}\n")
    print_markdown_table(rows)
    for name in args.models:
        summary = results[name]["profile"]
        if summary is None:
            continue
        print(f"\nProfile of the wrapped step, {name} ({args.profile_steps} steps; "
              f"self time {summary['self_time_ms_per_step']:.0f} ms/step, profiler overhead included)\n")
        print_markdown_table([{"op family (self time)": k, "ms/step": v["ms/step"], "share": v["share"]}
                              for k, v in summary["families"].items()])
        print()
        print_markdown_table([{"forward range (inclusive)": k, "ms/step": v}
                              for k, v in sorted(summary["forward_ranges_ms_per_step"].items())])
        print()
        print_markdown_table(summary["top_ops"])

    write_json_atomic(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                  "quant": quant.to_dict(), "optim": asdict(optim), "sizes": {
                                      **sizes, "autocast": precision}, "machine": machine_info(),
                                  "rows": rows, "details": results})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
