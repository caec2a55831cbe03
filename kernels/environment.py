"""Environment defaults applied before jax is first imported, so that optional compilers stay quiet on a CPU.

The `compilers` extra installs libtpu and the CUDA plugin for deviceless compiles. Without a TPU or a GPU in the
machine, both would otherwise speak up on `import jax` / `jax.devices()`: the CUDA plugin's extension modules log
"Could not find cuda drivers" once each (they look for libcudart.so.12 as they load), its version check prints a
traceback, and libtpu logs metadata errors. None of that is an error for a CPU user, so, only when the machine has
no accelerator, we (a) ask jax for the CPU backend unless the user chose platforms (JAX_PLATFORMS), which skips
the plugin's version check and libtpu's initialisation, and (b) load the CUDA runtime of the pip wheel
(nvidia-cuda-runtime-cu12, part of the extra) before jax does, so the plugin's modules find it. A machine with a GPU
or a TPU is left exactly as it is. Deviceless compiles still work: they ask for their platform explicitly.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips appear on the PCI bus under Google's vendor id
_NVIDIA_PCI_VENDOR = "0x10de"
_PCI_DISPLAY_OR_3D = ("0x0300", "0x0302")  # PCI class prefixes of GPUs (NVIDIA audio functions are 0x0403)


def _pci_devices(vendor: str, classes: tuple[str, ...] | None = None) -> bool:
    for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_path) as f:
                if f.read().strip() != vendor:
                    continue
            if classes is None:
                return True
            with open(os.path.join(os.path.dirname(vendor_path), "class")) as f:
                if f.read().strip()[:6] in classes:
                    return True
        except OSError:
            continue
    return False


def has_accelerator() -> bool:
    """True when the machine shows an NVIDIA GPU or a TPU (device files or PCI functions)."""
    if glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    return _pci_devices(_GOOGLE_PCI_VENDOR) or _pci_devices(_NVIDIA_PCI_VENDOR, _PCI_DISPLAY_OR_3D)


def _preload_cuda_runtime() -> None:
    """Load libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel, if installed (see the module docstring)."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except (ImportError, ValueError):
        return
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for library in sorted(glob.glob(os.path.join(folder, "lib", "libcudart.so.12*"))):
            try:
                ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _cpu_platform_for_loaded_jax() -> None:
    """jax was imported first: ask it for the CPU backend if it has chosen none and started no backend yet."""
    try:
        import jax
        from jax._src import xla_bridge
    except ImportError:
        return
    try:
        if jax.config.jax_platforms is None and not xla_bridge.backends_are_initialized():
            jax.config.update("jax_platforms", "cpu")
    except (AttributeError, RuntimeError):  # a jax without these: leave it as it is
        return


def apply_defaults() -> None:
    """Set the CPU-machine defaults described above (set PALLAS_AUTOTUNE_KEEP_ENV=1 to skip them); a no-op on a
    machine with a GPU or a TPU, or when JAX_PLATFORMS is set."""
    if os.environ.get("PALLAS_AUTOTUNE_KEEP_ENV") or "JAX_PLATFORMS" in os.environ or has_accelerator():
        return
    if "jax" in sys.modules:
        _cpu_platform_for_loaded_jax()
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if importlib.util.find_spec("jax_plugins") is not None:
        _preload_cuda_runtime()


apply_defaults()
