"""How long does one generated sample take, per sampler, step count, guidance and backend?

    python -m benchmarks.sampling --model study --estimate 50 --out docs/BENCHMARKS.md

Each row runs the real pipeline, emserve.pipelines.generate over a runtime from load_runtime, so the numpy
sampler, the guidance arithmetic and the runtime's input checks are all in the time. Guided rows run the
conditional and unconditional halves as one call of twice the batch, as served. A row with more steps than
`--estimate` is not run in full: the same sampler runs `--estimate-steps` steps through the same pipeline and the
time per step is multiplied by the step count (each step is one denoiser call of the same batch, so the cost per
step does not depend on where in the schedule it falls); the table says which rows are estimated.
Every row's speed-up is against the study's configuration (DDIM-250, eager torch fp32, guided) on the same
machine and model, timed in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Sequence

from benchmarks.common import (
    Backend,
    Model,
    add_common_arguments,
    check_triton_options,
    command_line,
    emit,
    flops_per_sample,
    header,
    machine_facts,
    markdown_table,
    number,
    open_backend,
    prepare_model,
    set_threads,
    timed,
    weight_facts,
    workspace,
)
from emserve.diffusion import SAMPLERS
from emserve.pipelines import GenerationRequest, generate

MODULE = "benchmarks.sampling"
DEFAULT_SAMPLERS = "ddpm:1000,ddim:250,ddim:50,dpmpp_2m:10,dpmpp_2m:15,dpmpp_2m:20,dpmpp_2m:25,dpmpp_3m:20"
COLUMNS = ("backend", "device", "precision", "sampler", "steps", "guided", "evaluations per sample",
           "s per sample", "GFLOP/s", "speed-up vs study", "how")


@dataclasses.dataclass(frozen=True)
class Config:
    """One row: which backend runs which sampler for how many steps, with or without guidance."""

    backend: str
    sampler: str
    steps: int
    guided: bool


#: The study's setting, the baseline of every speed-up: DDIM with 250 steps, fp32 eager torch, guided.
REFERENCE = Config("torch", "ddim", 250, True)


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """"ddim:250,dpmpp_2m:20" -> [("ddim", 250), ("dpmpp_2m", 20)]."""
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: give sampler:steps with a sampler from "
                                             f"{', '.join(SAMPLERS)} and steps >= 1, e.g. ddim:250")
        out.append((name, int(steps)))
    if not out:
        raise argparse.ArgumentTypeError("give at least one sampler:steps")
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--samplers", type=parse_samplers, default=DEFAULT_SAMPLERS, help="sampler:steps, ...")
    parser.add_argument("--batch", type=int, default=8, help="samples per generate call (`emserve generate` "
                                                              "--batch-size; guided calls run twice as many)")
    parser.add_argument("--guidance", type=float, default=6.0, help="guidance scale of the guided rows (the study's)")
    parser.add_argument("--rescale", type=float, default=0.7, help="guidance rescale of the guided rows")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (median reported)")
    parser.add_argument("--estimate", type=int, default=None, metavar="STEPS",
                        help="estimate rows with more than STEPS steps instead of running them in full "
                             "(0: every row; None: none)")
    parser.add_argument("--estimate-steps", type=int, default=5, help="steps of the short run an estimate scales")
    args = parser.parse_args(argv)
    if args.guidance in (0.0, 1.0):
        parser.error("--guidance: 0 and 1 skip one half of the guided call; give another scale, e.g. 6")
    if args.batch < 1 or args.repeats < 1 or args.estimate_steps < 1:
        parser.error("--batch, --repeats and --estimate-steps must be at least 1")
    check_triton_options(parser, args)
    return args


def configs(args: argparse.Namespace) -> list[Config]:
    """The rows: every backend x sampler x (guided, unguided), plus the study's configuration if not among them."""
    rows = [Config(backend, sampler, steps, guided) for backend in args.backends
            for sampler, steps in args.samplers for guided in (True, False)]
    return rows if REFERENCE in rows else [*rows, REFERENCE]


def request(model: Model, config: Config, args: argparse.Namespace, steps: int) -> GenerationRequest:
    """One batch, conditioned on the first class and dataset (where the model has them), as a user would ask."""
    card = model.card
    return GenerationRequest(samples=args.batch, sampler=config.sampler, steps=steps,
                             guidance=args.guidance if config.guided else 1.0,
                             rescale=args.rescale if config.guided else 0.0,
                             present=tuple(card.classes[:1]) if card.class_condition else (),
                             dataset=card.datasets[0] if card.datasets else None, batch_size=args.batch)


def run(backend: Backend, model: Model, req: GenerationRequest) -> None:
    for _ in generate(model.card, backend.runtime, req):
        pass


def seconds_per_sample(backend: Backend, model: Model, config: Config, args: argparse.Namespace) -> tuple[float, str]:
    """(seconds per sample, how it was obtained): a full run, or a short run scaled to the step count."""
    estimated = args.estimate is not None and config.steps > args.estimate
    steps = min(args.estimate_steps, config.steps) if estimated else config.steps
    req = request(model, config, args, steps)
    seconds = statistics.median(timed(lambda: run(backend, model, req), 0, args.repeats)) / args.batch
    if estimated:
        return seconds * config.steps / steps, f"estimated from {steps} steps"
    return seconds, "measured"


def measure(model: Model, args: argparse.Namespace, threads: int) -> dict[Config, tuple[Backend, float, str]]:
    """Time every row, one backend loaded at a time; each backend is warmed up (one step, guided and not) first."""
    todo = configs(args)
    results = {}
    for name in dict.fromkeys(c.backend for c in todo):
        backend = open_backend(name, model, args.device, threads, args.triton_url)
        try:
            for guided in (True, False):
                run(backend, model, request(model, Config(name, "ddim", 1, guided), args, 1))
            for config in (c for c in todo if c.backend == name):
                results[config] = (backend, *seconds_per_sample(backend, model, config, args))
        finally:
            backend.runtime.close()
    return results


def table_rows(results: dict[Config, tuple[Backend, float, str]], flops: int) -> list[list[object]]:
    reference = results[REFERENCE][1]
    rows = []
    for config, (backend, seconds, how) in results.items():
        evaluations = config.steps * (2 if config.guided else 1)
        rows.append([config.backend, backend.device, backend.precision, config.sampler, config.steps,
                     "yes" if config.guided else "no", evaluations, number(seconds),
                     number(flops * evaluations / seconds / 1e9), number(reference / seconds), how])
    return rows


def report(facts: dict[str, str], model: Model, args: argparse.Namespace, argv: Sequence[str], threads: int,
           flops: int, rows: list[list[object]]) -> str:
    guided = request(model, REFERENCE, args, REFERENCE.steps)
    facts = {**facts, "threads": str(threads), "model": model.describe(),
             "FLOPs per evaluation": f"{flops} per sample (a multiply-add counts 2; torch FlopCounterMode)",
             "request": f"batch {args.batch} per generate call; present {list(guided.present)}, dataset "
                        f"{guided.dataset}; guided rows: scale {args.guidance}, rescale {args.rescale}, one call "
                        f"of {2 * args.batch} per step",
             "timing": f"median of {args.repeats} run(s) per row after a one-step warm-up per backend; "
                       + ("every row measured in full" if args.estimate is None else
                          f"rows over {args.estimate} steps estimated from {args.estimate_steps}-step runs"),
             "speed-up": "time of the study's configuration (ddim 250, torch fp32, guided) / time of the row"}
    facts.update(weight_facts(model, rows))
    return (header(f"Sampling speed: {model.name}", command_line(MODULE, argv), facts) + "\n"
            + markdown_table(COLUMNS, rows))


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = set_threads(args.threads)
    facts = machine_facts()  # the load average before this run adds to it
    with workspace(args.workdir) as workdir:
        model = prepare_model(args.model, workdir, args.exporter, args.reexport)
        flops = flops_per_sample(model)
        rows = table_rows(measure(model, args, threads), flops)
        emit(report(facts, model, args, argv, threads, flops, rows), args.out)


if __name__ == "__main__":
    main()
