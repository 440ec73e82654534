"""How fast is one denoiser call, per backend and batch size, and how close does it get to the machine's peak?

    python -m benchmarks.denoiser --model study --batches 1,2,4,8,16 --out docs/BENCHMARKS.md

Every sampler step is one denoiser call, so this is the number that decides sampling speed. Each backend is
loaded through emserve.runtime.load_runtime (the same path as `emserve generate` and the service), timed after
warm-up calls as the median of N calls on fixed random inputs, and its achieved GFLOP/s is set against a large
matmul timed in the same run on the same threads: a low percentage means the backend, not the machine, is slow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

from benchmarks.common import (
    DTYPES,
    TRITON_DEVICE,
    Model,
    add_common_arguments,
    check_triton_options,
    command_line,
    emit,
    example_inputs,
    flops_per_sample,
    header,
    machine_facts,
    markdown_table,
    matmul_peak,
    number,
    open_backend,
    prepare_model,
    set_threads,
    timed,
    weight_facts,
    workspace,
)

MODULE = "benchmarks.denoiser"
COLUMNS = ("backend", "device", "precision", "batch", "ms per call", "ms per sample", "GFLOP/s", "% of peak")


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated batch sizes >= 1, e.g. 1,2,4,8,16")
    return batches


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batches", type=parse_batches, default="1,2,4,8,16", help="batch sizes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing each batch size")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per batch size (median reported)")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak matmul")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1 or args.peak_size < 1:
        parser.error("--warmup must be >= 0, --repeats and --peak-size >= 1")
    check_triton_options(parser, args)
    return args


def measure_backend(name: str, model: Model, args: argparse.Namespace, threads: int,
                    flops: int) -> list[list[object]]:
    """Table rows of one backend: one per batch size. The backend is closed before the next one loads, so
    an idle ONNX Runtime thread pool never competes with torch for the cores."""
    backend = open_backend(name, model, args.device, threads, args.triton_url)
    rows: list[list[object]] = []
    try:  # the peak is measured once per run (cached); the Triton server's hardware is not measured here
        peak = None if backend.device == TRITON_DEVICE else matmul_peak(backend.precision, backend.device,
                                                                        args.peak_size)
        for batch in args.batches:
            x, t, cond = example_inputs(model.card, batch)
            seconds = statistics.median(timed(lambda x=x, t=t, c=cond: backend.runtime(x, t, c),
                                              args.warmup, args.repeats))
            gflops = flops * batch / seconds / 1e9
            rows.append([name, backend.device, backend.precision, batch, number(1e3 * seconds),
                         number(1e3 * seconds / batch), number(gflops), number(100 * gflops / peak) if peak else "-"])
    finally:
        backend.runtime.close()
    return rows


def report(facts: dict[str, str], model: Model, args: argparse.Namespace, argv: Sequence[str], threads: int,
           flops: int, rows: list[list[object]]) -> str:
    local = {(row[1], row[2]) for row in rows if row[1] != TRITON_DEVICE}
    used = sorted(local, key=lambda dp: (dp[0], list(DTYPES).index(dp[1])))
    peaks = ", ".join(f"{p} on {d} {number(matmul_peak(p, d, args.peak_size))} GFLOP/s" for d, p in used)
    facts = {**facts, "threads": str(threads), "model": model.describe(),
             "FLOPs per sample": f"{flops} (= {number(flops / 1e9)} GFLOP; a multiply-add counts 2; convolutions, "
                                 f"linear layers and attention matmuls, counted by torch FlopCounterMode)",
             "peak": f"{peaks} ({args.peak_size}x{args.peak_size} matmul, median of 5, same threads)",
             "timing": f"{args.warmup} warm-up calls, then the median of {args.repeats} calls per row; fixed random "
                       f"inputs with non-null conditions"}
    if any(row[1] == TRITON_DEVICE for row in rows):
        facts["triton"] = (f"{args.triton_url}, timed from this client: transport and the server's queue included; "
                           f"no % of peak (the server's hardware is not measured here)")
    facts.update(weight_facts(model, rows))
    return (header(f"Denoiser speed: {model.name}", command_line(MODULE, argv), facts) + "\n"
            + markdown_table(COLUMNS, rows))


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = set_threads(args.threads)
    facts = machine_facts()  # the load average before this run adds to it
    with workspace(args.workdir) as workdir:
        model = prepare_model(args.model, workdir, args.exporter, args.reexport)
        flops = flops_per_sample(model)
        rows = [row for name in args.backends for row in measure_backend(name, model, args, threads, flops)]
        emit(report(facts, model, args, argv, threads, flops, rows), args.out)


if __name__ == "__main__":
    main()
