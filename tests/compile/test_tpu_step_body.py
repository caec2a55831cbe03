"""The TPU kernels' grid-step body against JAX's `flash_attention` (issue 22, part 2), from libtpu's final bundles.

One deviceless v5e compile of the gradient program each (it holds the forward with its log-sum-exp, dq and dk/dv)
at head_dim 64, bf16, non-causal, every block 512 (the issue's blocks; the body does not depend on batch, heads
or length, so the problem is small). Ours reads the caller's layout with two heads of head_dim 64 per 128-lane tile
(kernels.tpu.layout), so one of its grid steps does the work of two of JAX's: per head, it must step through no
more bundles than JAX's kernel of the same role, and issue no XLU lane permutes (`vperm.xlu*`): per-row values reach their tiles by whole-vreg tiling, not by
broadcasting a column (the old kernels: 2488 bundles and 192 permutes per forward step against JAX's 1686).
"""
from __future__ import annotations

import importlib.util

import pytest

from kernels.tpu.layout import Layout
from tests.compile_script import run_compile_script

SCRIPT = r"""
    import glob, json, os, re, shutil, sys, tempfile
    dump = tempfile.mkdtemp(prefix="step-body-")
    os.environ["LIBTPU_INIT_ARGS"] = f"--xla_jf_dump_to={dump} --xla_jf_dump_llo_pass_label_regex=final"
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.experimental.pallas.ops.tpu import flash_attention as jax_fa
    from jax.sharding import SingleDeviceSharding
    from autotune.compile.model.tpu_bundles import loop_bundles, parse_dump
    from autotune.compile.model.tpu_predict import DumpCollector
    from kernels import tpu
    dev = topologies.get_topology_desc("v5e:1x1", platform="tpu", chips_per_host_bounds=(1, 1, 1)).devices[0]
    sh = SingleDeviceSharding(dev)
    b, h, n, d, block = 1, 2, 1024, 64, 512
    ours = lambda q, k, v: tpu.flash_attention(q, k, v, config=tpu.Config(1, *[block] * 6),
                                               device_kind=dev.device_kind)
    sizes = jax_fa.BlockSizes(block_b=1, **{f: block for f in (
        "block_q", "block_k_major", "block_k", "block_q_major_dkv", "block_k_major_dkv", "block_k_dkv",
        "block_q_dkv", "block_k_major_dq", "block_k_dq", "block_q_dq")})
    theirs = lambda q, k, v: jax_fa.flash_attention(q, k, v, block_sizes=sizes, sm_scale=d ** -0.5)
    collector, out = DumpCollector(dump), {}
    for name, fn, shape in (("ours", ours, (b, n, h, d)), ("jax", theirs, (b, h, n, d))):
        x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sh)
        grads = lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do)
        jax.jit(grads).lower(x, x, x, x).compile()
        job = tempfile.mkdtemp(dir=os.path.dirname(dump))
        collector.collect(job)
        for program in parse_dump(job):
            if program.kind != "kernel":
                continue
            base = program.name.split(".")[0]
            role = "dkv" if "dkv" in base else "dq" if "dq" in base else "forward"
            path, = [p for p in glob.glob(os.path.join(job, f"*-{program.name}-*final_bundles.txt"))
                     if "schedule-analysis" not in p]
            out[f"{name}_{role}"] = dict(bundles=loop_bundles(program.grid_loop),
                                         permutes=len(re.findall(r"= vperm\.xlu", open(path).read())))
        shutil.rmtree(job, ignore_errors=True)
    shutil.rmtree(dump, ignore_errors=True)
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_tpu_step_bodies_no_longer_than_jax_and_free_of_lane_permutes():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[compilers]')")
    figures = run_compile_script(SCRIPT, {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    per_tile = Layout.of(2, 2, 64).per_tile
    assert per_tile == 2
    for role in ("forward", "dq", "dkv"):
        ours, theirs = figures[f"ours_{role}"], figures[f"jax_{role}"]
        assert ours["permutes"] == 0, (role, ours)
        assert 0 < ours["bundles"] / per_tile <= theirs["bundles"], (role, ours, theirs)
