"""Flash attention for TPU in Pallas (Mosaic TPU lowering), with the kernel surface the autotuner expects.

Runs on the CPU in TPU interpret mode (`interpret=True`), which is how it is tested without a TPU.
"""
from pathlib import Path

from kernels.tpu.attention import flash_attention
from kernels.tpu.config import Config, invalid_reasons, memory_estimate, search_space
from kernels.versioning import source_version

NAME = "flash_attention_tpu"
VERSION = source_version(Path(__file__).parent)

__all__ = ["NAME", "VERSION", "Config", "flash_attention", "invalid_reasons", "memory_estimate", "search_space"]
