"""Our HQQ solver vs. the `hqq` package: weight error and wall time on random matrices.

    python benchmarks/hqq_vs_reference.py [--matrices 20] [--json out.json]

For every setting (bits x group size x axis) and every matrix, both solvers quantize
the same tensor on the CPU in float32; we report, over the matrices, the median of
ours/reference for mean |W − Ŵ|, for MSE and for wall time (ratios < 1 favour ours).
Our solver runs with the reference's effective settings (its default solver never
grows β, so κ = 1); the "defaults" columns rerun ours with its own defaults
(κ = 1.01) for the error only. Matrices are seeded, alternating Gaussian and
Student-t (df = 3) entries, cycling through Qwen2-0.5B-like projection shapes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch

# Run as a script from a source checkout, the package need not be installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hh_lightning.files import write_json_atomic  # noqa: E402
from hh_lightning.hqq import hqq_quantize, rtn_quantize  # noqa: E402

SHAPES = ((896, 896), (4864, 896), (896, 4864))
DISTRIBUTIONS = ("normal", "student_t3")
STUDENT_T_DF = 3.0
BITS = (4, 3)
GROUP_SIZE = 64
AXIS = 1
# The reference's solver (hqq 0.2.x, optimize_weights_proximal_legacy) never applies
# kappa; everything else is its default.
REFERENCE_MATCHED = dict(lp_norm=0.7, beta=10.0, kappa=1.0, iters=20, early_stop=True)
DEFAULT_RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "hqq_vs_reference.json"


@dataclass
class MatrixRecord:
    bits: int
    index: int
    distribution: str
    shape: tuple[int, int]
    ours_abs: float
    ours_mse: float
    ref_abs: float
    ref_mse: float
    defaults_abs: float
    defaults_mse: float
    rtn_abs: float
    rtn_mse: float
    ours_seconds: float
    ref_seconds: float


def make_weight(index: int, seed: int, std: float) -> tuple[str, tuple[int, int], torch.Tensor]:
    distribution = DISTRIBUTIONS[index % len(DISTRIBUTIONS)]
    shape = SHAPES[index % len(SHAPES)]
    generator_seed = seed + index
    torch.manual_seed(generator_seed)
    if distribution == "normal":
        weight = torch.randn(shape)
    else:
        weight = torch.distributions.StudentT(STUDENT_T_DF).sample(shape)
    return distribution, shape, std * weight


def reference_quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE,
                       axis: int = AXIS) -> tuple[torch.Tensor, dict]:
    """The `hqq` package's HQQ codes and metadata for `weight` (its defaults, float32 compute)."""
    from hqq.core.quantize import Quantizer

    return Quantizer.quantize(
        weight,
        nbits=bits,
        group_size=group_size,
        optimize=True,
        round_zero=False,
        axis=axis,
        bitpack=False,
        compute_dtype=torch.float32,
        device=str(weight.device),
    )


def reference_dequantize(codes: torch.Tensor, meta: dict) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    meta = dict(meta, compute_dtype=torch.float32)  # it falls back to float16 otherwise
    return Quantizer.dequantize(codes, meta)


def errors(weight: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float]:
    difference = weight - reconstruction
    return difference.abs().mean().item(), difference.square().mean().item()


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def benchmark_matrix(index: int, bits: int, seed: int, std: float) -> MatrixRecord:
    distribution, shape, weight = make_weight(index, seed, std)
    # Alternate who goes first so that drift in machine load does not favour one side.
    if index % 2 == 0:
        ours, ours_seconds = timed(hqq_quantize, weight, bits, GROUP_SIZE, AXIS, **REFERENCE_MATCHED)
        (ref_codes, ref_meta), ref_seconds = timed(reference_quantize, weight, bits)
    else:
        (ref_codes, ref_meta), ref_seconds = timed(reference_quantize, weight, bits)
        ours, ours_seconds = timed(hqq_quantize, weight, bits, GROUP_SIZE, AXIS, **REFERENCE_MATCHED)
    ours_abs, ours_mse = errors(weight, ours.dequantize())
    ref_abs, ref_mse = errors(weight, reference_dequantize(ref_codes, ref_meta))
    defaults_abs, defaults_mse = errors(weight, hqq_quantize(weight, bits, GROUP_SIZE, AXIS).dequantize())
    rtn_abs, rtn_mse = errors(weight, rtn_quantize(weight, bits, GROUP_SIZE, AXIS).dequantize())
    return MatrixRecord(
        bits, index, distribution, shape, ours_abs, ours_mse, ref_abs, ref_mse,
        defaults_abs, defaults_mse, rtn_abs, rtn_mse, ours_seconds, ref_seconds,
    )  # fmt: skip


def summarize(records: list[MatrixRecord]) -> dict:
    def median_ratio(numerator: str, denominator: str) -> float:
        return statistics.median(getattr(r, numerator) / getattr(r, denominator) for r in records)

    return {
        "bits": records[0].bits,
        "group_size": GROUP_SIZE,
        "axis": AXIS,
        "matrices": len(records),
        "abs_ratio": median_ratio("ours_abs", "ref_abs"),
        "mse_ratio": median_ratio("ours_mse", "ref_mse"),
        "time_ratio": median_ratio("ours_seconds", "ref_seconds"),
        "worst_abs_ratio": max(r.ours_abs / r.ref_abs for r in records),
        "worst_mse_ratio": max(r.ours_mse / r.ref_mse for r in records),
        "ours_median_ms": 1e3 * statistics.median(r.ours_seconds for r in records),
        "ref_median_ms": 1e3 * statistics.median(r.ref_seconds for r in records),
        "defaults_abs_ratio": median_ratio("defaults_abs", "ref_abs"),
        "defaults_mse_ratio": median_ratio("defaults_mse", "ref_mse"),
        "rtn_abs_ratio": median_ratio("rtn_abs", "ref_abs"),
        "rtn_mse_ratio": median_ratio("rtn_mse", "ref_mse"),
    }


def markdown_table(summaries: list[dict]) -> str:
    header = (
        "| bits | group | axis | matrices | abs ratio | MSE ratio | time ratio | ours ms | hqq ms "
        "| worst abs / MSE ratio | defaults κ=1.01 abs / MSE ratio | RTN/hqq abs / MSE |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {s['bits']} | {s['group_size']} | {s['axis']} | {s['matrices']} | {s['abs_ratio']:.4f} "
        f"| {s['mse_ratio']:.4f} | {s['time_ratio']:.3f} | {s['ours_median_ms']:.0f} | {s['ref_median_ms']:.0f} "
        f"| {s['worst_abs_ratio']:.4f} / {s['worst_mse_ratio']:.4f} "
        f"| {s['defaults_abs_ratio']:.4f} / {s['defaults_mse_ratio']:.4f} "
        f"| {s['rtn_abs_ratio']:.4f} / {s['rtn_mse_ratio']:.4f} |"
        for s in summaries
    ]
    return "\n".join([header, *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=20, help="random matrices per setting")
    parser.add_argument("--json", type=Path, default=DEFAULT_RESULTS_PATH, help="where to write the results")
    parser.add_argument("--seed", type=int, default=0, help="matrix i uses seed + i")
    parser.add_argument(
        "--weight-std", type=float, default=1.0,
        help="multiplies the unit-scale entries; HQQ's beta is in weight units, so this matters "
        "(at LLM scale, ~0.02, the l_p prox is inactive)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: what torch picks); 1 is steadier on a busy machine",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    summaries, records = [], []
    for bits in BITS:
        # Warm-up: first calls pay for lazy initialization (imports, allocator, kernels).
        _, _, warmup_weight = make_weight(0, args.seed, args.weight_std)
        hqq_quantize(warmup_weight, bits, GROUP_SIZE, AXIS, **REFERENCE_MATCHED)
        reference_quantize(warmup_weight, bits)

        setting_records = []
        for index in range(args.matrices):
            record = benchmark_matrix(index, bits, args.seed, args.weight_std)
            setting_records.append(record)
            print(
                f"bits={bits} #{index:02d} {record.distribution:10s} {record.shape}: "
                f"abs {record.ours_abs / record.ref_abs:.4f} mse {record.ours_mse / record.ref_mse:.4f} "
                f"time {record.ours_seconds:.2f}s / {record.ref_seconds:.2f}s",
                file=sys.stderr,
                flush=True,
            )
        summaries.append(summarize(setting_records))
        records.extend(setting_records)

    command = "python " + " ".join([os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]])
    print(f"`{command}` (torch {torch.__version__}, hqq {version('hqq')}, {torch.get_num_threads()} threads)\n")
    print(markdown_table(summaries))

    write_json_atomic(
        args.json,
        {
            "command": command,
            "torch": torch.__version__,
            "hqq": version("hqq"),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "weight_std": args.weight_std,
            "seed": args.seed,
            "reference_matched_settings": REFERENCE_MATCHED,
            "summaries": summaries,
            "records": [asdict(record) for record in records],
        },
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
