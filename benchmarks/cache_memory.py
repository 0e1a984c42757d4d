"""Peak RSS of building the activation cache: all SmolLM2-135M layers vs the first few.

The cache streams every block boundary to disk, so its memory should not grow
with the number of layers. Each case runs in a fresh subprocess that loads the
GGUF model, truncates it to `K` layers (`model.model.layers` and
`config.num_hidden_layers`), tokenizes WikiText-2 valid, draws `N` windows of
`L` tokens, runs one warm-up window, then a plain forward pass over the
windows (the control), then builds the cache in a temporary directory
(deleted after).

Reported per case (MiB):
* `ru_maxrss`: the child's whole-life peak (`resource.getrusage`). The GGUF
  load dominates it (all 30 layers are dequantized before truncation), so it
  says little about the cache.
* `weights`: the truncated model's parameter bytes.
* `rss_before`: resident set after loading, truncating and warming up.
* `forward_peak` / `build_peak`: the peak RSS during the control pass and
  during the build (Linux: the high-water mark is reset through
  /proc/self/clear_refs before each; elsewhere a thread samples RSS).
* `peak_minus_weights` = `build_peak - weights`: everything resident during
  the build except the parameters (runtime, libraries, activations, cache).
* `cache_overhead` = `build_peak - forward_peak`: what the cache adds on top
  of the forward pass it needs anyway.
* `all_in_ram`: what holding every boundary in RAM would cost instead.

Goal: `peak_minus_weights(most layers) / peak_minus_weights(fewest) <= 1.2`.
Weights are taken out because a 30-layer model has ~370 MB more fp32
parameters than a 4-layer one whatever the cache does. The ratio can only
expose a cache that holds activations in RAM when `all_in_ram` is large next
to the ~0.5 GiB fixed part (the runtime and the embedding matrix), e.g.
`--n-samples 32 --seq-len 256` (279 MiB for 31 boundaries); at the small
defaults read `cache_overhead` against `all_in_ram` instead.

Children run with glibc's mmap threshold pinned (`MALLOC_MMAP_THRESHOLD_`,
off with `--no-pin-malloc`): by default glibc raises the threshold after the
forward pass frees its first large buffers and then keeps freed memory in the
heap, which adds 10-40 MiB of run-to-run noise to every peak unrelated to
the cache.

Run: `python benchmarks/cache_memory.py [--n-samples 8] [--seq-len 256] [--layers 30 4]`
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _common import machine_info, print_markdown_table, write_json_atomic  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "cache_memory.json"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "wikitext-2-raw"
RESULT_PREFIX = "RESULT "
GOAL_RATIO = 1.2
PINNED_MMAP_THRESHOLD = str(128 * 1024)  # glibc's initial default, kept fixed
MIB = 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, nargs="+", default=[30, 4],
                        help="layer counts to compare (each in its own subprocess)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF model file (default: fetch SmolLM2-135M-Instruct into the cache dir)")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("HH_DATA_DIR", DEFAULT_DATA_DIR)))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--no-pin-malloc", dest="pin_malloc", action="store_false",
                        help="leave glibc's dynamic mmap threshold on in the children")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


# ------------------------------------------------------------------ memory probes


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # bytes on macOS, KiB on Linux


class PeakRss:
    """Peak RSS over a `with` block: exact on Linux (reset VmHWM), sampled elsewhere."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakRss:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            self.peak_bytes = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())


# ------------------------------------------------------------------ one case (child)


def run_child(args: argparse.Namespace) -> None:
    import torch

    from hh_lightning.cache import build_activation_cache, cache_fingerprint
    from hh_lightning.models import decoder_layers, fetch_smollm2_gguf, load_model
    from hh_lightning.text import calibration_windows, load_wikitext_text, tokenize_text

    (n_layers,) = args.layers
    gguf = args.gguf or fetch_smollm2_gguf()
    started = time.perf_counter()
    model, tokenizer = load_model(str(gguf))
    load_s = time.perf_counter() - started
    total_layers = len(decoder_layers(model))
    if not 1 <= n_layers <= total_layers:
        raise SystemExit(f"--layers {n_layers} out of range 1..{total_layers}")
    model.model.layers = decoder_layers(model)[:n_layers]
    model.config.num_hidden_layers = n_layers
    gc.collect()

    token_ids = tokenize_text(tokenizer, load_wikitext_text("validation", args.data_dir))
    windows = calibration_windows(token_ids, args.n_samples, args.seq_len, args.seed)
    fingerprint = cache_fingerprint(
        model_source=str(gguf), model=model, tokenizer=tokenizer, data_source=str(args.data_dir),
        split="validation", n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype,
    )
    del token_ids
    gc.collect()

    def forward_only() -> None:
        for start in range(0, args.n_samples, args.batch_size):
            with torch.no_grad():
                model.model(input_ids=windows[start : start + args.batch_size], use_cache=False)

    with torch.no_grad():  # first-call lazy initialization is not cache memory
        model.model(input_ids=windows[:1], use_cache=False)
    maxrss_before = ru_maxrss_bytes()  # resetting VmHWM below also resets getrusage's value
    rss_before = current_rss_bytes()
    started = time.perf_counter()
    with PeakRss() as forward_peak:
        forward_only()
    forward_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="hh_cache_memory_") as work_dir:
        started = time.perf_counter()
        with PeakRss() as build_peak:
            manifest = build_activation_cache(
                model, windows, Path(work_dir) / "cache", dtype=args.dtype,
                batch_size=args.batch_size, fingerprint=fingerprint, progress=False,
            )
        build_s = time.perf_counter() - started
        cache_bytes = sum(r["bytes"] for name, r in manifest.files.items() if name.startswith("boundary_"))

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied counted once
    result = {
        "layers": n_layers,
        "boundaries": n_layers + 1,
        "ru_maxrss_mib": max(maxrss_before, ru_maxrss_bytes()) / MIB,
        "weights_mib": weight_bytes / MIB,
        "rss_before_mib": rss_before / MIB,
        "forward_peak_mib": forward_peak.peak_bytes / MIB,
        "build_peak_mib": build_peak.peak_bytes / MIB,
        "peak_minus_weights_mib": (build_peak.peak_bytes - weight_bytes) / MIB,
        "cache_overhead_mib": (build_peak.peak_bytes - forward_peak.peak_bytes) / MIB,
        "all_in_ram_mib": cache_bytes / MIB,
        "forward_s": forward_s,
        "build_s": build_s,
        "load_s": load_s,
        "peak_method": build_peak.method,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "torch_threads": torch.get_num_threads(),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------ driver (parent)


def child_command(args: argparse.Namespace, n_layers: int) -> list[str]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child",
        "--layers", str(n_layers), "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--seed", str(args.seed),
        "--data-dir", str(args.data_dir),
    ]
    if args.gguf is not None:
        command += ["--gguf", str(args.gguf)]
    return command


def run_case(args: argparse.Namespace, n_layers: int) -> dict:
    command = child_command(args, n_layers)
    print(f"[{n_layers} layers] {shlex.join(command[1:])}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    if args.pin_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = PINNED_MMAP_THRESHOLD
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"child for --layers {n_layers} failed (exit {completed.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    if args.gguf is None:
        from hh_lightning.models import fetch_smollm2_gguf

        args.gguf = fetch_smollm2_gguf()  # once here, not racing in the children
    runs = [run_case(args, n) for n in args.layers]
    fewest = min(runs, key=lambda r: r["layers"])
    most = max(runs, key=lambda r: r["layers"])
    ratios = {key: most[key] / fewest[key] for key in ("peak_minus_weights_mib", "ru_maxrss_mib", "build_peak_mib")}
    ratio = ratios["peak_minus_weights_mib"]
    passed = ratio <= GOAL_RATIO

    columns = ["layers", "boundaries", "ru_maxrss_mib", "weights_mib", "rss_before_mib", "forward_peak_mib",
               "build_peak_mib", "peak_minus_weights_mib", "cache_overhead_mib", "all_in_ram_mib", "build_s"]
    print(f"N={args.n_samples} L={args.seq_len} batch={args.batch_size} dtype={args.dtype} "
          f"model={args.gguf.name} pinned_malloc={args.pin_malloc}")
    print_markdown_table([{c: r[c] for c in columns} for r in runs])
    print(", ".join(f"{key} ratio {value:.3f}" for key, value in ratios.items())
          + f" ({most['layers']} vs {fewest['layers']} layers)")
    print(f"goal: peak_minus_weights ratio {ratio:.3f} <= {GOAL_RATIO}: {'PASS' if passed else 'FAIL'}")

    write_json_atomic(args.json, {
        "benchmark": "cache_memory",
        "command": shlex.join([Path(sys.executable).name] + sys.argv),
        "config": {"n_samples": args.n_samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "dtype": args.dtype, "seed": args.seed, "model": str(args.gguf),
                   "data": str(args.data_dir), "split": "validation", "pin_malloc": args.pin_malloc},
        "runs": runs,
        "goal_metric": "peak_minus_weights_mib",
        "ratios": ratios,
        "goal_ratio": GOAL_RATIO,
        "passed": passed,
        "machine": machine_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
