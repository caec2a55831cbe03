"""Tuned attention on a mesh: the kernel runs once per device, inside `shard_map` over the batch and head axes.

A Pallas kernel cannot be partitioned by the compiler (Mosaic refuses: "cannot be automatically partitioned"), so a
call whose inputs are sharded runs the kernel inside `jax.shard_map` over the mesh axes of q's batch and head
dimensions, where it sees (and the runtime looks up a config for) the per-device shape. Attention needs every key
of a sequence on the device of its query: a sharded sequence or head_dim axis is refused with the axis named.

How the inputs are sharded is read from q's type when the mesh's axes are Explicit (`jax.make_mesh`'s default).
Under a mesh with Auto axes the sharding is not visible inside `jax.jit`: declare it with `sharded_as(mesh, spec)`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from autotune.device import DeviceInfo
from kernels.devices import INTERPRET, platform_of

_declared: contextvars.ContextVar[tuple[Any, PartitionSpec] | None] = contextvars.ContextVar(
    "autotune_sharded_as", default=None)


@dataclass(frozen=True)
class Layout:
    """Where the attention inputs live: the mesh, the mesh axes of the batch and head dims, the mesh's device."""

    mesh: Any  # jax.sharding.Mesh or AbstractMesh
    batch: Any  # a mesh axis name, a tuple of them, or None
    heads: Any
    device: DeviceInfo | None  # None: the mesh's devices are the default backend's

    def spec(self, rank: int) -> PartitionSpec:
        """The spec of an input of this rank: [batch, seq, heads, head_dim] (4), [batch, seq] (2), [batch] (1)."""
        return PartitionSpec(*(self.batch, None, self.heads, None)[:rank])


@contextlib.contextmanager
def sharded_as(mesh, spec: PartitionSpec) -> Iterator[None]:
    """Declare that query, key and value are sharded over `mesh` as `spec` ([batch, seq, heads, head_dim]).

    Needed only for meshes with Auto axes (e.g. `jax.sharding.Mesh(devices, names)`), whose shardings `jax.jit`
    does not show to the function it traces; with Explicit axes the inputs' own sharding is used.
    """
    if not isinstance(spec, PartitionSpec):
        raise ValueError(f"spec must be a jax.sharding.PartitionSpec, got {type(spec).__name__}")
    if len(spec) > 4:
        raise ValueError(f"spec must have at most 4 entries [batch, seq, heads, head_dim], got {spec}")
    token = _declared.set((mesh, spec))
    try:
        yield
    finally:
        _declared.reset(token)


def _entries(spec: PartitionSpec) -> tuple:
    return tuple(spec) + (None,) * (4 - len(spec))


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _size(mesh, entry) -> int:
    return math.prod(mesh.shape[name] for name in _names(entry))


def _spec_of(x):
    """The (mesh, spec) x's type carries, or None when it has no mesh (or cannot say)."""
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - numpy arrays, old avals: not sharded as far as we can see
        return None
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    if AxisType.Explicit not in tuple(sharding.mesh.axis_types):
        return None  # Auto axes: the type does not say how x is sharded (declare it with `sharded_as`)
    return sharding.mesh, sharding.spec  # a type with Explicit axes reaches Pallas only inside shard_map, even 1x1


def _device_of_mesh(mesh) -> DeviceInfo | None:
    """The DeviceInfo of the mesh's devices when they are not the default backend's (e.g. a TPU topology)."""
    abstract = getattr(mesh, "abstract_mesh", mesh)
    device = getattr(abstract, "abstract_device", None)
    if device is None:
        return None
    platform = platform_of(device.platform)
    if platform == INTERPRET or device.platform == jax.default_backend():
        return None
    return DeviceInfo(platform, str(device.device_kind), jax.__version__, socket.gethostname())


def layout_of(query, key) -> Layout | None:
    """The mesh layout of a call, or None when its inputs carry no mesh; ValueError for layouts it cannot run."""
    found = _spec_of(query)
    declared = _declared.get()
    if found is None and declared is not None:
        found = declared
    if found is None:
        return None
    mesh, spec = found
    batch, seq, heads, dim = _entries(spec)
    found_in, own = "query", _spec_of(key)
    if seq is None and own is not None and _entries(own[1])[1] is not None:
        seq, found_in = _entries(own[1])[1], "key"
    if seq is not None:
        raise ValueError(
            f"the sequence axis of {found_in} is sharded over mesh axis {seq!r}: the tuned kernel needs each "
            f"device to hold whole sequences. Shard only the batch and head axes (e.g. "
            f"jax.sharding.reshard(x, PartitionSpec({batch!r}, None, {heads!r}, None))), or use "
            f"implementation='xla'")
    if dim is not None:
        raise ValueError(f"the head_dim axis of query is sharded over mesh axis {dim!r}: shard only the batch and "
                         f"head axes, or use implementation='xla'")
    return Layout(mesh, batch, heads, _device_of_mesh(mesh))


def check_divides(layout: Layout, query, key) -> None:
    """ValueError unless the mesh axes divide the batch, the query heads and the kv heads."""
    checks = (("batch of query", query.shape[0], layout.batch), ("heads of query", query.shape[2], layout.heads),
              ("kv heads of key and value", key.shape[2], layout.heads))
    for what, n, entry in checks:
        size = _size(layout.mesh, entry)
        if n % size:
            raise ValueError(f"the {what} ({n}) cannot be split evenly over mesh axis {entry!r} of size {size}: "
                             f"shard over fewer devices (GQA: at most as many as the kv heads)")


def run_sharded(layout: Layout, body: Callable, *arrays, out_ranks: tuple[int, ...] = (4,)):
    """`body(*arrays)` once per device over the layout's batch and head axes (None entries pass through); its
    outputs have these ranks ([batch, seq, heads, head_dim], or (4, 3) with a [batch, seq, heads] log-sum-exp)."""
    present = [i for i, x in enumerate(arrays) if x is not None]

    def per_device(*given):
        full = list(arrays)
        for i, x in zip(present, given):
            full[i] = x
        return body(*full)

    specs = tuple(layout.spec(arrays[i].ndim) for i in present)
    explicit = AxisType.Explicit in tuple(layout.mesh.axis_types)
    given = []
    for i, spec in zip(present, specs):  # e.g. lengths left replicated beside a batch-sharded query: split them
        own = _spec_of(arrays[i])
        rank = arrays[i].ndim
        needs = explicit and (own is None or _entries(own[1])[:rank] != _entries(spec)[:rank])
        given.append(jax.sharding.reshard(arrays[i], NamedSharding(layout.mesh, spec)) if needs else arrays[i])
    out_specs = layout.spec(out_ranks[0]) if len(out_ranks) == 1 else tuple(layout.spec(r) for r in out_ranks)
    mapped = jax.shard_map(per_device, mesh=layout.mesh, in_specs=specs, out_specs=out_specs,
                           check_vma=False)  # the kernels' out_shape carries no varying-axes annotation
    return mapped(*given)
