"""`autotune bench`: the tuned config against the default and the usual alternatives, timed side by side.

Every implementation gets the same rotating input buffers and the same interleaved timing as the search's final
re-timing, so the numbers compare with what `search` stored. Throughput is reported against a peak that is measured
here (a large matmul timed the same way), not a datasheet figure, so the share of peak means "of what this machine
actually reaches".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import click

from kernels.devices import INTERPRET
from autotune.measure.cost import INTERPRET_CAVEAT, problem_flops

from autotune.problem_fields import DEFAULT_DOCUMENTS
from autotune.cli.common import (database_errors, db_option, describe_problem, echo_json, first_line,
                                      format_ms, kernel_option_module, missing_database, open_store, print_table,
                                      problem_options, specs_from_flags)

# Matmul edge per platform for the peak: big enough to saturate the device, quick on a CPU.
PEAK_SIZE = {"gpu": 8192, "tpu": 8192, INTERPRET: 1024}


@dataclass
class Peak:
    """What a large matmul of one dtype reached on this device."""

    dtype: str
    size: int
    time_s: float

    @property
    def tflops(self) -> float:
        return 2.0 * self.size ** 3 / self.time_s / 1e12


@dataclass
class Entry:
    """One implementation of one problem: its time, or why it was not timed."""

    name: str
    call: Callable | None = None
    config: dict | None = None
    time_s: float | None = None
    spread_s: float | None = None
    note: str = ""
    same_as: str | None = None  # the entry whose timing this one shares (the tuned config is the default)


def measure_peak(dtype: str, size: int, policy) -> Peak:
    """Time a size x size matmul with the search's timer (two input buffers in rotation)."""
    import jax
    import jax.numpy as jnp

    from autotune.measure.timing import time_call

    keys = jax.random.split(jax.random.key(0), 4)
    arrays = [jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys]
    matmul = jax.jit(lambda a, b: a @ b)
    timing = time_call(matmul, [(arrays[0], arrays[1]), (arrays[2], arrays[3])], policy)
    return Peak(dtype, size, timing.median_s)


def reference_call(problem) -> Callable:
    """The einsum reference with the candidates' signature, forward or forward plus backward."""
    from autotune.measure.kernel_call import jitted_call
    from kernels import attention_reference

    def forward(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
        ids = None if q_ids is None else (q_ids, kv_ids)
        return attention_reference(q, k, v, causal=problem.causal, segment_ids=ids, window=problem.window,
                                   softcap=problem.softcap, q_lengths=q_lengths, kv_lengths=kv_lengths)

    return jitted_call(forward, problem)


def contenders(problem, kernel, device, best) -> list[Entry]:
    """Every implementation to time, built but not yet run; those that cannot run here carry a note."""
    from autotune.measure.baselines import dot_product_attention_call, pallas_mha_call
    from autotune.measure.kernel_call import compile_candidate

    entries = []
    from autotune.kernel_protocol import device_kind_of

    default = kernel.Config.default(problem, device_kind=device_kind_of(device)).to_dict()
    for name, config in (("tuned", best.config if best else None), ("default", default)):
        entry = Entry(name, config=config)
        if config is None:
            entry.note = "not tuned: no best stored for this key"
        elif name == "tuned" and config == default:
            entry.note, entry.same_as = "the default config (timed once)", "default"
        else:
            entry.call = _guard(entry, lambda c=config: compile_candidate(
                kernel, kernel.Config.from_dict(c), problem, interpret=device.interpret).call)
        entries.append(entry)
    mha = Entry("jax pallas mha")
    if device.platform == "tpu":
        mha.note = "a GPU (Triton) kernel: runs on GPU or in interpret mode on CPU"
    else:
        mha.call = _guard(mha, lambda: pallas_mha_call(problem, interpret=device.interpret))
        if mha.call is None and not mha.note:
            mha.note = "cannot run this problem (segments with q_len != kv_len, or lengths not multiples of 128)"
    entries.append(mha)
    xla = Entry("xla dot_product_attention")
    xla.call = _guard(xla, lambda: dot_product_attention_call(problem, "xla"))
    entries.append(xla)
    cudnn = Entry("cudnn dot_product_attention")
    if device.platform == "gpu":
        cudnn.call = _guard(cudnn, lambda: dot_product_attention_call(problem, "cudnn"))
    else:
        cudnn.note = "GPU only"
    entries.append(cudnn)
    reference = Entry("einsum reference")
    reference.call = _guard(reference, lambda: reference_call(problem))
    entries.append(reference)
    return entries


def _guard(entry: Entry, build: Callable) -> Callable | None:
    """Build a callable; a failure becomes the entry's note instead of stopping the bench."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - one implementation failing must not hide the others
        entry.note = f"failed: {first_line(f'{type(exc).__name__}: {exc}', 90)}"
        return None


def time_entries(entries: list[Entry], arg_sets: list[tuple], policy) -> None:
    """Run each callable once (dropping those that fail, with a note), then time the rest interleaved."""
    import jax

    from autotune.measure.timing import time_interleaved

    runnable = {}
    for entry in entries:
        if entry.call is None:
            continue
        try:
            jax.block_until_ready(entry.call(*arg_sets[0]))
            runnable[entry.name] = entry.call
        except Exception as exc:  # noqa: BLE001
            entry.note = f"failed: {first_line(f'{type(exc).__name__}: {exc}', 90)}"
    timings = time_interleaved(runnable, arg_sets, policy) if runnable else {}
    for entry in entries:
        timing = timings.get(entry.same_as or entry.name)
        if timing is not None:
            entry.time_s, entry.spread_s = timing.median_s, timing.spread_s


def entry_json(entry: Entry, flops: float, peak: Peak, default_time: float | None) -> dict[str, Any]:
    tflops = flops / entry.time_s / 1e12 if entry.time_s else None
    return {
        "name": entry.name, "config": entry.config, "time_s": entry.time_s, "spread_s": entry.spread_s,
        "tflops": tflops, "peak_share": tflops / peak.tflops if tflops else None,
        "vs_default": default_time / entry.time_s if default_time and entry.time_s else None, "note": entry.note,
    }


@click.command("bench")
@problem_options(backward_help="Time forward plus backward.")
@click.option("--shapes", type=click.Path(exists=True, dir_okay=False),
              help="TOML or JSON file of problems. Problem flags given beside it apply to each of its problems that "
                   "does not set the field itself (--backward tunes the backward of every one).")
@click.option("--kernel", default=None, help="gpu | tpu | a module path (default: the platform's kernel).")
@click.option("--samples", type=click.IntRange(min=3), default=None, help="Timing samples per implementation.")
@click.option("--peak-size", type=click.IntRange(min=64), default=None,
              help="Edge of the matmul that measures the peak [default: 8192 on GPU/TPU, 1024 on CPU].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@db_option
def bench_command(shapes, kernel, samples, peak_size, seed, as_json, db, **flags):
    """Time tuned, default and other attentions side by side.

    For each problem: the tuned config (from the database), the kernel's default config, JAX's Pallas `mha`, XLA's
    and cuDNN's `jax.nn.dot_product_attention` and the einsum reference, with TFLOP/s and the share of a peak
    measured here by a large matmul.
    """
    from autotune.device import current_device
    from autotune.keys import make_key
    from autotune.measure.evaluation import timing_inputs
    from autotune.options import SearchOptions
    from autotune.options import TimingPolicy

    device = current_device()
    kernel_module = kernel_option_module(kernel, device)
    specs = specs_from_flags(flags, shapes)
    missing = missing_database(db)
    store = None if missing else open_store(db, create=False, read_only=True)  # none: nothing tuned, still benched
    if missing and not as_json:
        click.echo(f"No results database at {missing}: the tuned column stays empty.")
    policy = TimingPolicy(samples=samples) if samples else TimingPolicy()
    size = peak_size or PEAK_SIZE[device.platform]
    peaks: dict[str, Peak] = {}
    report = []
    if device.interpret and not as_json:
        click.echo(INTERPRET_CAVEAT)
    for spec in specs:
        problem = spec.problem
        if problem.dtype not in peaks:
            peaks[problem.dtype] = measure_peak(problem.dtype, size, policy)
            if not as_json:
                peak = peaks[problem.dtype]
                click.echo(f"Peak {peak.tflops:.3g} TFLOP/s: a {size}x{size} {peak.dtype} matmul measured on "
                           f"{device.device_kind} [{device.platform}] ({format_ms(peak.time_s)} ms)")
        key = make_key(kernel_module, problem, device)
        best = None
        if store is not None:
            with database_errors(store):
                best = store.get_best(key)
        entries = contenders(problem, kernel_module, device, best)
        options = SearchOptions(documents=spec.documents or DEFAULT_DOCUMENTS, timing=policy)
        time_entries(entries, timing_inputs(problem, options, seed), policy)
        flops = problem_flops(problem)
        default_time = next(e.time_s for e in entries if e.name == "default")
        rows = [entry_json(e, flops, peaks[problem.dtype], default_time) for e in entries]
        report.append({"problem": problem.to_dict(), "description": describe_problem(problem), "digest": key.digest(),
                       "best_id": best.id if best else None, "flops": flops, "results": rows})
        if not as_json:
            print_bench(problem, flops, rows)
    if as_json:
        echo_json({
            "device": {"platform": device.platform, "device_kind": device.device_kind,
                       "jax_version": device.jax_version, "host": device.host},
            "kernel": {"name": kernel_module.NAME, "version": kernel_module.VERSION},
            "peaks": {d: {"tflops": p.tflops, "size": p.size, "time_s": p.time_s} for d, p in peaks.items()},
            "problems": report,
        })


def format_flops(flops: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.4g} {unit}"
    return f"{flops:.4g} FLOP"


def print_bench(problem, flops: float, rows: list[dict]) -> None:
    label = "forward+backward" if problem.backward else "forward"
    click.echo(f"\n{describe_problem(problem)}: {format_flops(flops)} ({label})")
    table = [[r["name"], format_ms(r["time_s"]), format_ms(r["spread_s"]),
              "-" if r["tflops"] is None else f"{r['tflops']:.3g}",
              "-" if r["peak_share"] is None else f"{100 * r['peak_share']:.3g}%",
              "-" if r["vs_default"] is None else f"{r['vs_default']:.2f}x", r["note"]] for r in rows]
    print_table(["implementation", "ms", "spread ms", "TFLOP/s", "of peak", "vs default", "note"], table)

