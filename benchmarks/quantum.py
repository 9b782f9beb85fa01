"""Forward+backward time of the hybrid head's circuit layer on every simulation backend.

One run measures, on the same circuit, weights, angles and batch, one forward and backward
pass (input gradients on, as the hybrid head uses them) of the circuit layer of
:mod:`pipelines.quantum.backends`:

- ``reference``: qiskit-machine-learning on qiskit's ``StatevectorEstimator`` with
  parameter-shift gradients;
- ``aer``: qiskit-machine-learning on qiskit-aer's ``EstimatorV2`` (exact: no shots, no
  noise) with parameter-shift gradients on Aer;
- ``qiskit-ml``: qiskit-machine-learning on ``TorchEstimator`` + ``TorchEstimatorGradient``;
- ``torch``: the torch statevector layer on the CPU;
- ``torch-cuda``: the same on CUDA, only when a CUDA device is present (``--cuda-qubits``).

The circuit is ``build_circuit(n, reps=2, "linear")`` (ZZ feature map, 2 reps, and a
``real_amplitudes`` ansatz, 2 reps: ``3 n`` weights) with ``<Z_i>`` on every qubit. Each
cell (backend, qubits, batch) is warmed up once, then timed as the median of repeats (until
``--min-time`` seconds in all or ``--max-repeats``). A cell whose estimated time is over
``--max-seconds`` is skipped and recorded as such; its time is never extrapolated. Every
measured cell's outputs and gradients are checked against the ``torch`` backend (exit 1
when any differs by more than 1e-6).

    .venv/bin/python benchmarks/quantum.py                      # full grid (minutes)
    .venv/bin/python benchmarks/quantum.py --quick              # smoke run: 4 qubits, batch 8
    .venv/bin/python benchmarks/quantum.py --qubits 4 8 --batches 64 \\
        --backends torch qiskit-ml --max-seconds 60 --out /tmp/quantum.json

Writes JSON to ``--out`` (default ``benchmarks/results/quantum.json``) and the markdown
table, also printed to stdout, next to it (``quantum.md``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import write_json  # noqa: E402 (sibling module)

from pipelines.quantum.backends import AerSettings, make_circuit_layer  # noqa: E402
from pipelines.quantum.circuits import build_circuit, z_observables  # noqa: E402

BACKENDS = ("reference", "aer", "qiskit-ml", "torch", "torch-cuda")
CPU_BACKENDS = BACKENDS[:4]
# Backends run in this order within a cell: the torch backend first, it is the yardstick.
RUN_ORDER = ("torch", "torch-cuda", "qiskit-ml", "aer", "reference")
REPS = 2
ENTANGLEMENT = "linear"
TOLERANCE = 1e-6
# The parameter-shift backends loop over circuits one by one: nothing depends on the batch
# size, so their warm-up (imports, first-call set-up) runs on a few rows only.
SLOW_BACKENDS = frozenset({"reference", "aer"})
SLOW_WARMUP_ROWS = 4
# Rows checked against the CPU torch backend where that backend has no cell of the same size.
CHECK_ROWS = 8
# (backend, n_qubits, batch, minimum speedup over the reference) from the project's issue.
TARGETS = (("torch", 4, 64, 1000.0), ("qiskit-ml", 4, 64, 100.0))


@dataclass(frozen=True)
class CellData:
    """Angles, weights and loss coefficients shared by every backend at one (qubits, batch)."""

    angles: np.ndarray  # (batch, n_qubits) in [0, pi]
    weights: np.ndarray  # (3 n_qubits,) in [-1, 1]
    coeffs: np.ndarray  # (batch, n_qubits): loss = sum(outputs * coeffs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick`` replaces the grid by 4 qubits, batch 8)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--qubits", type=int, nargs="+", default=[4, 8, 12], help="qubit counts of the CPU grid"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[64, 1024], help="batch sizes (every backend)"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=CPU_BACKENDS,
        default=list(CPU_BACKENDS),
        help="CPU backends to run (torch-cuda is added by --cuda-qubits when CUDA is present)",
    )
    parser.add_argument(
        "--cuda-qubits",
        type=int,
        nargs="*",
        default=None,
        help="qubit counts for torch-cuda, with --batches (default 12 16 20; none disables)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="skip a cell whose estimated time (one forward+backward) is over this",
    )
    parser.add_argument("--min-time", type=float, default=1.0, help="repeat until this long")
    parser.add_argument("--max-repeats", type=int, default=5, help="or this many repeats")
    parser.add_argument("--seed", type=int, default=0, help="seed of angles, weights, coeffs")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 qubits, batch 8, every backend"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "quantum.json",
        help="JSON path; the markdown table goes next to it with the suffix .md",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.qubits, args.batches = [4], [8]
        if args.cuda_qubits is None:
            args.cuda_qubits = [4]
    if args.cuda_qubits is None:
        args.cuda_qubits = [12, 16, 20]
    if min(args.qubits + args.cuda_qubits) < 1 or min(args.batches) < 1:
        parser.error("qubit counts and batch sizes must be at least 1")
    if args.max_repeats < 1:
        parser.error("--max-repeats must be at least 1")
    return args


def _version(package: str) -> str | None:
    """Installed version of ``package``, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU count, Python, platform, library versions and the CUDA device (or None)."""
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "qiskit": _version("qiskit"),
        "qiskit_aer": _version("qiskit-aer"),
        "qiskit_machine_learning": _version("qiskit-machine-learning"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def n_parameters(n_qubits: int) -> int:
    """Circuit parameters (one angle per qubit plus the ansatz weights)."""
    return n_qubits + n_qubits * (REPS + 1)


def _float32_exact(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float32, as float64 (TorchConnector keeps float32 weights)."""
    return values.astype(np.float32).astype(np.float64)


def cell_data(n_qubits: int, batch: int, seed: int) -> CellData:
    """Seeded inputs of one (qubits, batch), the same for every backend and every grid.

    Angles, weights and coefficients are float32-representable so the qiskit-ml based
    backends (whose TorchConnector holds float32 weights and returns float32 outputs) see
    exactly the values the torch backend sees. The coefficients are divided by the batch
    size, so the loss is a batch mean as in training and the gradients stay of order one.
    """
    rng = np.random.default_rng([seed, n_qubits, batch])
    angles = _float32_exact(rng.uniform(0.0, np.pi, (batch, n_qubits)))
    weights = _float32_exact(rng.uniform(-1.0, 1.0, n_parameters(n_qubits) - n_qubits))
    coeffs = _float32_exact(rng.uniform(-1.0, 1.0, (batch, n_qubits))) / batch
    return CellData(angles, weights, coeffs)


def build_layer(backend: str, n_qubits: int, weights: np.ndarray) -> torch.nn.Module:
    """The circuit layer of ``backend`` (``torch-cuda``: the torch layer on CUDA)."""
    circuit, inputs, weight_params = build_circuit(n_qubits, REPS, ENTANGLEMENT)
    observables = z_observables(n_qubits)
    if backend == "torch-cuda":
        return make_circuit_layer(
            "torch", circuit, inputs, weight_params, observables, weights, torch.device("cuda")
        )
    aer = AerSettings() if backend == "aer" else None
    return make_circuit_layer(
        backend, circuit, inputs, weight_params, observables, weights, aer=aer
    )


def _device(backend: str) -> torch.device:
    """Where a backend's inputs live."""
    return torch.device("cuda" if backend == "torch-cuda" else "cpu")


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(
    layer: torch.nn.Module, angles: torch.Tensor, coeffs: torch.Tensor
) -> tuple[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Seconds of one forward + backward of ``sum(layer(angles) * coeffs)``, and
    (outputs, input gradients, weight gradients)."""
    layer.zero_grad(set_to_none=True)
    x = angles.detach().clone().requires_grad_(True)
    _sync(angles.device)
    start = time.perf_counter()
    out = layer(x)
    (out * coeffs).sum().backward()
    _sync(angles.device)
    seconds = time.perf_counter() - start
    return seconds, (out.detach(), x.grad, layer.weight.grad)


def _as_numpy(results: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    """Float64 numpy copies of result tensors."""
    return tuple(t.detach().cpu().double().numpy() for t in results)


def time_cell(
    backend: str, n_qubits: int, data: CellData, min_time: float, max_repeats: int
) -> dict[str, Any]:
    """Warm up once, then time forward+backward until ``min_time`` s or ``max_repeats``.

    Returns the median and the samples, the warm-up, circuit results computed by one
    forward+backward, and the results of the last repeat (for the correctness check).
    """
    device = _device(backend)
    layer = build_layer(backend, n_qubits, data.weights)
    angles = torch.as_tensor(data.angles, device=device)
    coeffs = torch.as_tensor(data.coeffs, device=device)
    warmup_rows = min(len(angles), SLOW_WARMUP_ROWS) if backend in SLOW_BACKENDS else len(angles)
    warmup, _ = forward_backward(layer, angles[:warmup_rows], coeffs[:warmup_rows])
    samples: list[float] = []
    while True:
        before = int(layer.circuit_evaluations)
        seconds, results = forward_backward(layer, angles, coeffs)
        evaluations = int(layer.circuit_evaluations) - before
        samples.append(seconds)
        if len(samples) >= max_repeats or sum(samples) >= min_time:
            break
    return {
        "seconds": statistics.median(samples),
        "samples": samples,
        "warmup_rows": warmup_rows,
        "warmup_seconds": warmup,
        "circuit_evaluations": evaluations,
        "results": _as_numpy(results),
    }


def torch_cpu_results(n_qubits: int, data: CellData, rows: int | None = None) -> tuple:
    """Outputs and gradients of the CPU torch backend on the first ``rows`` rows (untimed)."""
    layer = build_layer("torch", n_qubits, data.weights)
    angles = torch.as_tensor(data.angles[:rows])
    coeffs = torch.as_tensor(data.coeffs[:rows])
    return _as_numpy(forward_backward(layer, angles, coeffs)[1])


def max_abs_diff(got: tuple[np.ndarray, ...], expected: tuple[np.ndarray, ...]) -> dict:
    """Largest absolute differences of outputs, input gradients and weight gradients."""
    names = ("outputs", "input_grads", "weight_grads")
    diffs = {
        name: float(np.max(np.abs(a - b))) if np.all(np.isfinite(a)) else float("inf")
        for name, a, b in zip(names, got, expected, strict=True)
    }
    diffs["max"] = max(diffs.values())
    return diffs


def estimate_seconds(previous: dict[str, Any] | None, n_qubits: int, batch: int) -> float | None:
    """One forward+backward's time scaled from ``previous``, the backend's last measured cell,
    by the batch ratio, the circuit-parameter ratio and the statevector-size ratio; None for
    a backend's first cell (always measured)."""
    if previous is None:
        return None
    return (
        previous["seconds_median"]
        * (batch / previous["batch"])
        * (n_parameters(n_qubits) / n_parameters(previous["n_qubits"]))
        * 2.0 ** (n_qubits - previous["n_qubits"])
    )


def _is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA or host out-of-memory errors."""
    return isinstance(error, torch.cuda.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def plan(args: argparse.Namespace, cuda: bool) -> list[tuple[int, int, list[str]]]:
    """The cells to run: (qubits, batch, backends in run order), the CPU grid first."""
    cells = []
    for n_qubits in args.qubits:
        for batch in args.batches:
            names = [b for b in RUN_ORDER if b in args.backends]
            if cuda and n_qubits in args.cuda_qubits:
                names.insert(names.index("torch") + 1 if "torch" in names else 0, "torch-cuda")
            cells.append((n_qubits, batch, names))
    if cuda:
        for n_qubits in args.cuda_qubits:
            if n_qubits not in args.qubits:
                cells.extend((n_qubits, batch, ["torch-cuda"]) for batch in args.batches)
    return cells


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Measure every planned cell: (rows, correctness failures)."""
    cuda = torch.cuda.is_available()
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    last_measured: dict[str, dict[str, Any]] = {}
    for n_qubits, batch, names in plan(args, cuda):
        data = cell_data(n_qubits, batch, args.seed)
        truth: tuple | None = None
        for backend in names:
            row: dict[str, Any] = {
                "backend": backend,
                "n_qubits": n_qubits,
                "batch": batch,
                "n_weights": len(data.weights),
            }
            rows.append(row)
            label = f"{backend} {n_qubits} qubits batch {batch}"
            estimate = estimate_seconds(last_measured.get(backend), n_qubits, batch)
            if estimate is not None and estimate > args.max_seconds:
                row.update(
                    skipped=True,
                    reason=f"estimated {estimate:.0f} s > budget {args.max_seconds:g} s",
                    estimated_seconds=round(estimate, 1),
                )
                print(f"{label}: skipped ({row['reason']})", file=sys.stderr, flush=True)
                continue
            guess = f" (estimated {estimate:.3g} s)" if estimate is not None else ""
            print(f"{label}: measuring{guess} ...", file=sys.stderr, flush=True)
            try:
                timing = time_cell(backend, n_qubits, data, args.min_time, args.max_repeats)
            except Exception as error:  # out of memory is recorded, anything else raised
                if not _is_out_of_memory(error):
                    raise
                row.update(skipped=True, reason=f"out of memory: {str(error)[:200]}")
                print(f"{label}: skipped (out of memory)", file=sys.stderr, flush=True)
                continue
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            seconds = timing["seconds"]
            row.update(
                seconds_median=seconds,
                repeats=len(timing["samples"]),
                seconds_samples=timing["samples"],
                samples_per_s=batch / seconds,
                warmup_rows=timing["warmup_rows"],
                warmup_seconds=timing["warmup_seconds"],
                circuit_evaluations=timing["circuit_evaluations"],
            )
            last_measured[backend] = row

            # Correctness: every backend against the CPU torch backend.
            if backend == "torch":
                truth = timing["results"]
                row["max_abs_diff_vs_torch"] = None
            else:
                got = timing["results"]
                if truth is None and backend != "torch-cuda":
                    truth = torch_cpu_results(n_qubits, data)
                if truth is not None:
                    expected = truth
                else:  # torch-cuda at a size the CPU grid does not run: check a few rows
                    check_rows = min(batch, CHECK_ROWS)
                    expected = torch_cpu_results(n_qubits, data, check_rows)
                    layer = build_layer(backend, n_qubits, data.weights)
                    device = _device(backend)
                    got = _as_numpy(
                        forward_backward(
                            layer,
                            torch.as_tensor(data.angles[:check_rows], device=device),
                            torch.as_tensor(data.coeffs[:check_rows], device=device),
                        )[1]
                    )
                    del layer
                    row["check_rows"] = check_rows
                diffs = max_abs_diff(got, expected)
                row["max_abs_diff_vs_torch"] = diffs["max"]
                row["abs_diff_vs_torch"] = diffs
                if not diffs["max"] <= TOLERANCE:
                    message = f"{label}: differs from torch by {diffs} > {TOLERANCE:g}"
                    failures.append(message)
                    print(f"CORRECTNESS CHECK FAILED: {message}", file=sys.stderr, flush=True)
            check = row.get("max_abs_diff_vs_torch")
            check_text = "" if check is None else f", max |diff| vs torch {check:.1e}"
            print(
                f"{label}: {seconds * 1e3:.4g} ms median of {row['repeats']}{check_text}",
                file=sys.stderr,
                flush=True,
            )

    # Speedups over the reference cell of the same size (when it was measured).
    reference = {
        (r["n_qubits"], r["batch"]): r["seconds_median"]
        for r in rows
        if r["backend"] == "reference" and "seconds_median" in r
    }
    torch_cpu = {
        (r["n_qubits"], r["batch"]): r["seconds_median"]
        for r in rows
        if r["backend"] == "torch" and "seconds_median" in r
    }
    for row in rows:
        key = (row["n_qubits"], row["batch"])
        if "seconds_median" not in row:
            continue
        if key in reference:
            row["speedup_vs_reference"] = reference[key] / row["seconds_median"]
        if row["backend"] == "torch-cuda" and key in torch_cpu:
            row["speedup_vs_torch_cpu"] = torch_cpu[key] / row["seconds_median"]
    order = {name: i for i, name in enumerate(BACKENDS)}
    rows.sort(key=lambda r: (r["n_qubits"], r["batch"], order[r["backend"]]))
    return rows, failures


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's speedup targets with the measured speedups (None when not measured)."""
    found = []
    for backend, n_qubits, batch, target in TARGETS:
        speedup = next(
            (
                r.get("speedup_vs_reference")
                for r in rows
                if (r["backend"], r["n_qubits"], r["batch"]) == (backend, n_qubits, batch)
            ),
            None,
        )
        found.append(
            {
                "backend": backend,
                "n_qubits": n_qubits,
                "batch": batch,
                "target_speedup_vs_reference": target,
                "speedup_vs_reference": speedup,
                "met": None if speedup is None else bool(speedup >= target),
            }
        )
    return found


def _ms(seconds: float) -> str:
    """Milliseconds with about three significant digits."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _times(speedup: float | None) -> str:
    """A speedup as ``123x``, or ``-``."""
    if speedup is None:
        return "-"
    return f"{speedup:,.0f}x" if speedup >= 100 else f"{speedup:.1f}x"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows (qubits, batch) x columns (per backend: ms and speedup over the reference)."""
    present = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    header = ["qubits", "batch"]
    for backend in present:
        header.append(f"{backend} ms")
        if backend != "reference":
            header.append(f"{backend} vs ref")
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" for _ in header) + " |",
    ]
    by_cell: dict[tuple[int, int], dict[str, dict]] = {}
    for row in rows:
        by_cell.setdefault((row["n_qubits"], row["batch"]), {})[row["backend"]] = row
    for (n_qubits, batch), cell in sorted(by_cell.items()):
        values = [str(n_qubits), str(batch)]
        for backend in present:
            row = cell.get(backend)
            if row is None:
                ms, times = "-", "-"
            elif row.get("skipped"):
                oom = row["reason"].startswith("out of memory")
                ms, times = ("out of memory" if oom else "skipped"), "-"
            else:
                ms, times = _ms(row["seconds_median"]), _times(row.get("speedup_vs_reference"))
            values.append(ms)
            if backend != "reference":
                values.append(times)
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write JSON and markdown, print the table; 1 on a failed check."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    rows, failures = run(args)
    targets = check_targets(rows)
    command = "python benchmarks/quantum.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    payload = {
        "benchmark": "quantum",
        "command": command.strip(),
        "machine": machine_info(),
        "method": {
            "circuit": (
                f"build_circuit(n, reps={REPS}, '{ENTANGLEMENT}'): zz_feature_map (2 reps) +"
                f" real_amplitudes ({REPS} reps), 3n weights, <Z_i> on every qubit"
            ),
            "inputs": (
                f"per (n, batch), seed {args.seed}: angles U[0, pi], weights U[-1, 1],"
                " coefficients U[-1, 1] / batch, all float32-representable; the same for"
                " every backend"
            ),
            "measurement": (
                "forward + backward of sum(layer(x) * coefficients) with x.requires_grad"
                " (input and weight gradients); CUDA synchronized before and after"
            ),
            "warmup": (
                "one forward+backward before timing, excluded (compilation and caches):"
                f" on the full batch, on {SLOW_WARMUP_ROWS} rows for reference and aer"
            ),
            "repeats": (
                f"median of repeats until {args.min_time:g} s in all or {args.max_repeats}"
                " repeats, at least 1"
            ),
            "budget": (
                f"a cell is skipped when its estimate exceeds {args.max_seconds:g} s: the"
                " backend's last measured cell scaled by the batch ratio, the circuit-"
                "parameter ratio and 2**(qubit difference); a backend's first cell is"
                " always measured; skipped cells have no time"
            ),
            "correctness": (
                f"outputs, input and weight gradients vs the CPU torch backend, max abs diff"
                f" <= {TOLERANCE:g} (torch-cuda at sizes without a CPU cell: first"
                f" {CHECK_ROWS} rows)"
            ),
            "aer": "AerSettings(): exact expectations (no shots), no noise",
        },
        "total_seconds": round(time.perf_counter() - started, 1),
        "targets": targets,
        "correctness_ok": not failures,
        "correctness_failures": failures,
        "rows": rows,
    }
    write_json(args.out, payload)
    table = markdown_table(rows)
    markdown = args.out.with_suffix(".md")
    markdown.write_text(f"    {command.strip()}\n\n{table}")
    print(table)
    for target in targets:
        speedup = target["speedup_vs_reference"]
        status = (
            "not measured"
            if speedup is None
            else f"{speedup:,.0f}x ({'met' if target['met'] else 'NOT met'})"
        )
        print(
            f"target: {target['backend']} >= {target['target_speedup_vs_reference']:g}x the"
            f" reference at {target['n_qubits']} qubits, batch {target['batch']}: {status}"
        )
    print(f"wrote {args.out} and {markdown} in {payload['total_seconds']} s")
    if failures:
        print(f"{len(failures)} correctness check(s) FAILED:", file=sys.stderr)
        for message in failures:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
