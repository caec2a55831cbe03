"""DMA bytes in the TPU model: the granule is the chip's, and an XLA program's predicated write-back waits move its
output once (synthetic dumps in libtpu's format, so these run without libtpu)."""
from __future__ import annotations

import pytest

from autotune.compile.model.hardware import tpu_hardware
from autotune.compile.model.tpu_bundles import output_bytes, parse_dump
from autotune.compile.model.tpu_model import predict_programs, predicated_wait_weight

# one program: a 10-trip loop (8 steps + 2 pipeline trips) waiting 1024 granules for its input every trip and,
# guarded by a predicate, 2048 granules for its output tile
_BUNDLES = """\
   0x0   :  { %s1 = smov 0 }
   0x1 LB: > { %s2 = sadd.s32 1, %s1 }
   0x2   : > { %3 = dma.done.wait %s4, 1024 /* pipeline-emitter-dma-wait */ }
   0x3   : > { %5 = dma.done.wait (%p6_p1), %s7, 2048 /* pipeline-emitter-dma-wait */ }
   0x4   : > { %p8 = scmp.ge.s32.totalorder %s2, 10 /* loop exit test */ }
   0x5   :  { %9 = sbr.rel (!%p8) target = $region1 }
"""


def _dump(folder, result: str) -> str:
    (folder / "1-fusion-03-final_bundles.txt").write_text(_BUNDLES)
    (folder / "1-fusion-02-schedule-analysis_final_bundles.txt").write_text(
        "Schedule analysis:\n\t6.00 scheduled bundles (100.00%): %fusion = " + result
        + " fusion(%x.1, %y.1), kind=kOutput\n")
    return str(folder)


def test_output_bytes_reads_the_hlo_result_type(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\t1.0 bundles: %fusion = bf16[8192,8192]{1,0:T(8,128)(2,1)} fusion(%x.1), kind=kOutput\n")
    assert output_bytes(str(path)) == 8192 * 8192 * 2
    path.write_text("\t1.0 bundles: %f = (f32[4,8]{1,0}, bf16[16]{0}) fusion(%x.1)\n")
    assert output_bytes(str(path)) == 4 * 8 * 4 + 16 * 2
    assert output_bytes(str(tmp_path / "missing.txt")) is None


def test_predicated_waits_move_the_output_once(tmp_path):
    (program,) = parse_dump(_dump(tmp_path, "f32[2048,8]{1,0}"))  # 64 KiB = 2048 granules of 32 B, once
    assert program.grid_loop.trips == 10
    assert sum(b.predicated_dma_granules for b in program.bundles) == 2048
    assert predicated_wait_weight(program, tpu_hardware("v5e")) == pytest.approx(1 / 10)
    prediction = predict_programs([program], tpu_hardware("v5e"))
    assert prediction.parts["roofline_memory"] == pytest.approx((10 * 1024 + 2048) * 32 / 819e9)


def test_an_output_every_trip_keeps_every_wait(tmp_path):
    (program,) = parse_dump(_dump(tmp_path, "f32[20480,8]{1,0}"))  # the output is 10 tiles: written every trip
    assert predicated_wait_weight(program, tpu_hardware("v5e")) == 1.0


def test_v4_counts_512_byte_granules(tmp_path):
    (program,) = parse_dump(_dump(tmp_path, "f32[327680,8]{1,0}"))  # 10 tiles of 2048 x 512 B: every trip
    v4, v5e = predict_programs([program], tpu_hardware("v4")), predict_programs([program], tpu_hardware("v5e"))
    assert v4.parts["roofline_memory"] * tpu_hardware("v4").hbm_bytes_per_s == pytest.approx(10 * 3072 * 512)
    assert v5e.parts["roofline_memory"] * tpu_hardware("v5e").hbm_bytes_per_s == pytest.approx(10 * 3072 * 32)
