"""What we run on: platform, device kind and versions, as they go into a tuning key."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import lru_cache

import jax

from kernels.devices import INTERPRET, platform_of


@dataclass(frozen=True)
class DeviceInfo:
    """The hardware half of a tuning key. `interpret` is true where kernels can only run in interpret mode."""

    platform: str  # "gpu", "tpu" or kernels.devices.INTERPRET
    device_kind: str
    jax_version: str
    host: str

    @property
    def interpret(self) -> bool:
        return self.platform == INTERPRET


@lru_cache(maxsize=None)
def current_device(backend: str | None = None) -> DeviceInfo:
    """Describe the default device (or the given backend's first device)."""
    device = jax.devices(backend)[0]
    platform = platform_of(device.platform)
    return DeviceInfo(platform, str(device.device_kind), jax.__version__, socket.gethostname())


def device_of(array) -> DeviceInfo:
    """The DeviceInfo of the platform an array (or tracer's default backend) lives on."""
    try:
        devices = array.devices()
        platform = next(iter(devices)).platform
    except Exception:  # tracers and abstract values carry no device: use the default backend
        return current_device()
    return current_device(platform)
