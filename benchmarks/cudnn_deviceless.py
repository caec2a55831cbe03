"""Can jax.nn's cuDNN fused attention be compiled for a GPU target on a machine without a GPU? (issue 27)

Compiles `jax.nn.dot_product_attention(implementation="cudnn")` (and "xla" beside it) for the h100 compile target
(autotune.compile.targets, the jax CUDA plugin deviceless) on a few problems, forward and forward+backward, and
says per case whether it compiled, which custom calls and thunks XLA made of it, and in what time. jax needs the
cuDNN 9 libraries to lower the cuDNN path at all (`pip install 'nvidia-cudnn-cu12>=9.8,<10'`, about 0.7 GB, not
part of the `compilers` extra; point LD_LIBRARY_PATH at its `nvidia/cudnn/lib` when it is installed elsewhere).
The finding is written to benchmarks/results/cudnn-deviceless.md.

    LD_LIBRARY_PATH=/path/to/nvidia/cudnn/lib python benchmarks/cudnn_deviceless.py
"""
from __future__ import annotations

import glob
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: F401,E402  (environment defaults before jax)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from autotune.compile.targets import get_target, gpu_target_config  # noqa: E402

TARGET = "h100"
FINDING = """## What it means

- With the cuDNN 9 libraries installed, XLA:GPU compiles jax.nn's cuDNN fused attention for a GPU it does not have:
  the forward and the backward become `__cudnn$fmha*` custom calls run by `kCuDnn` thunks, with XLA's own code
  around them. Without them (the `compilers` extra has no cuDNN) jax refuses before XLA sees anything:
  `RuntimeError: cuDNN not found.`
- What compiles is an opaque call into cuDNN's library: no SASS of ours and no figures of its own in the dump
  (shared memory, registers, a schedule): its engine is picked inside cuDNN. The static GPU model
  (autotune/compile/model) reads the SASS of the kernels it predicts, so it has nothing to predict cuDNN's time
  from: a GPU target's prediction can cover our kernel and XLA's attention (compiled XLA code it can read), not
  cuDNN. A cuDNN win is decided on the device, in the search's final re-timing.
"""


def attention(implementation: str, causal: bool, window, lengths: bool, backward: bool):
    def forward(q, k, v, kv_lengths):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window,
                                            key_value_seq_lengths=kv_lengths if lengths else None,
                                            implementation=implementation)

    if not backward:
        return forward
    return jax.grad(lambda q, k, v, n: forward(q, k, v, n).astype(jnp.float32).sum(), argnums=(0, 1, 2))


CASES = {  # name: (causal, window, lengths, backward)
    "forward, causal": (True, None, False, False),
    "forward, causal, window (256, 0), padding lengths": (True, (256, 0), True, False),
    "forward + backward, causal": (True, None, False, True),
}


def compile_case(device, implementation: str, case: tuple) -> str:
    sharding = SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((2, 2048, 16, 128), jnp.bfloat16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((2, 2048, 4, 128), jnp.bfloat16, sharding=sharding)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=sharding)
    with tempfile.TemporaryDirectory() as dump:
        start = time.perf_counter()
        try:
            compiled = jax.jit(attention(implementation, *case)).lower(q, kv, kv, lengths).compile(
                compiler_options={"xla_dump_to": dump})
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        seconds = time.perf_counter() - start
        text = compiled.as_text()
        calls = sorted({line.split('custom_call_target="')[1].split('"')[0] for line in text.splitlines()
                        if 'custom_call_target="' in line})
        thunks = "".join(Path(p).read_text() for p in glob.glob(dump + "/*thunk_sequence.txt"))
        cudnn_thunks = sum("kCuDnn" in line for line in thunks.splitlines())
    return (f"compiled in {seconds:.1f} s; custom calls: {', '.join(calls) or 'none'}; "
            f"kCuDnn thunks: {cudnn_thunks}")


def main() -> None:
    target = get_target(TARGET)
    topology = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=gpu_target_config(target),
                                            topology="1x1x1")
    device = topology.devices[0]
    lines = [f"# jax.nn's cuDNN attention compiled without a GPU ({target.device_kind}, jax {jax.__version__})", "",
             "Written by `benchmarks/cudnn_deviceless.py` on a CPU-only machine: q [2, 2048, 16, 128], k and v "
             "[2, 2048, 4, 128], bfloat16, compiled deviceless for the h100 target.", "",
             "| case | implementation | outcome |", "| --- | --- | --- |"]
    for name, case in CASES.items():
        for implementation in ("cudnn", "xla"):
            outcome = compile_case(device, implementation, case)
            print(f"{name} [{implementation}]: {outcome}", flush=True)
            lines.append(f"| {name} | {implementation} | {outcome} |")
    out = Path(__file__).resolve().parent / "results" / "cudnn-deviceless.md"
    out.write_text("\n".join(lines) + "\n\n" + FINDING)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
