"""Flash attention for NVIDIA GPUs in Pallas (Triton lowering), with the surface the autotuner and runtime use.

`VERSION` hashes this package's sources, so any edit of the kernel invalidates configs tuned for the old one.
"""
from pathlib import Path

from kernels.gpu.attention import flash_attention
from kernels.gpu.config import Config, invalid_reasons, memory_estimate, search_space
from kernels.versioning import source_version

NAME = "flash_attention_gpu"
VERSION = source_version(Path(__file__).parent)

__all__ = ["NAME", "VERSION", "Config", "flash_attention", "invalid_reasons", "memory_estimate", "search_space"]
