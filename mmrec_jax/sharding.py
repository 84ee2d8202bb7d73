"""Every jit and sharding decision of training and evaluation lives here.

One mesh spans all devices of all processes with a single `data` axis. Batches (rows and
the item block) are split over `data`. Parameters and optimizer state are replicated,
or, with FSDP, each large array is split over `data` along its largest divisible axis.
State is created already sharded: `jax.eval_shape` gives the shapes, then
`jax.jit(init, out_shardings=...)` materialises each shard on its device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Arrays smaller than this many elements stay replicated under FSDP: sharding them
# saves no memory worth the collectives.
FSDP_MIN_SIZE = 2**14

# Environment variables that make a run multi-process (set on every process).
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the coordinator variables are set.

    Reads JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. On CPU it selects the gloo collectives so jitted collectives work
    across processes. Must run before anything touches a JAX device. Once JAX's
    distributed runtime is up, later calls in the process only report it (a script may
    call `evaluate.main` and then `export.main`, each of which calls this).

    Returns:
      True when this is a multi-process run.

    Raises:
      ValueError: only some of the variables are set, or they are not integers.
    """
    present = [name for name in COORDINATOR_ENV if os.environ.get(name)]
    if not present:
        return False
    if len(present) != len(COORDINATOR_ENV):
        missing = sorted(set(COORDINATOR_ENV) - set(present))
        raise ValueError(
            f"Multi-process run needs all of {', '.join(COORDINATOR_ENV)}; missing "
            f"{', '.join(missing)}. Set them on every process, or unset them all."
        )
    try:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
        process_id = int(os.environ["JAX_PROCESS_ID"])
    except ValueError as error:
        raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers.") from error
    if jax.distributed.is_initialized():
        return True
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process).

    The devices are ordered by process (stably), so each process's devices hold one
    contiguous part of the `data` axis: a global batch is the processes' local batches
    end to end, which the item slots of the input pipeline rely on.

    The axis type is given explicitly as Auto: shardings are fixed at the jit boundary
    (batch over `data`, parameters replicated or FSDP) and XLA propagates them inside.
    """
    devices = by_process(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def by_process(devices) -> list:
    """`devices` grouped by `process_index` in process order, each group in given order."""
    return sorted(devices, key=lambda device: device.process_index)


def _data_axis_size(mesh: Mesh) -> int:
    """The size of the mesh's `data` axis, or a ValueError naming the axes it has."""
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"The mesh has axes {tuple(mesh.axis_names)}; these helpers split batches and "
            f"parameters over an axis named {DATA_AXIS!r} (`make_mesh` builds such a mesh)."
        )
    return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array copied whole onto every device."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch array: leading axis split over `data`."""
    _data_axis_size(mesh)
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _fsdp_spec(shape: tuple[int, ...], num_shards: int) -> PartitionSpec:
    """Splits the largest axis divisible by `num_shards`; replicates small arrays."""
    if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE or num_shards == 1:
        return PartitionSpec()
    axes = sorted(range(len(shape)), key=lambda axis: -shape[axis])
    for axis in axes:
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(mesh: Mesh, abstract_state: Any, fsdp: bool) -> Any:
    """Shardings for a pytree of `jax.ShapeDtypeStruct`s (parameters, optimizer state).

    Args:
      mesh: the mesh.
      abstract_state: the state's shapes, e.g. from `jax.eval_shape`.
      fsdp: split large arrays over `data` instead of replicating everything.
    """
    num_shards = _data_axis_size(mesh)

    def sharding_of(leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        spec = _fsdp_spec(shape, num_shards) if fsdp else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding_of, abstract_state)


def create_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, fsdp: bool, *args: Any
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` so that its outputs are born sharded.

    Returns:
      (state, shardings): the state as sharded `jax.Array`s and the shardings used.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(mesh, abstract, fsdp)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def put_global(tree: Any, shardings: Any) -> Any:
    """Places host values that every process holds in full onto global shardings.

    Unlike `jax.device_put`, each process only builds its own shards (through
    `jax.make_array_from_callback`), which is what multi-process runs need.
    """

    def put(value: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def put_replicated(mesh: Mesh, tree: Any) -> Any:
    """`put_global` of host values (equal on every process), each replicated over `mesh`."""
    spec = replicated(mesh)
    return put_global(tree, jax.tree.map(lambda _: spec, tree))


def batch_shardings(mesh: Mesh, batch: Mapping) -> Any:
    """The sharding of every array of a batch: leading axis over `data`."""
    return jax.tree.map(lambda _: data_sharding(mesh), batch)


def global_batch(mesh: Mesh, local_batch: Mapping) -> Any:
    """Assembles this process's numpy batch into global `jax.Array`s on the mesh.

    Each process passes its own rows (and its own item block); the global batch is their
    concatenation along the leading axis, split over the `data` axis.
    """
    sharding = data_sharding(mesh)
    local_devices = len(mesh.local_devices)

    def put(path, array):
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] % local_devices:
            name = ".".join(str(getattr(key, "key", key)) for key in path)
            raise ValueError(
                f"Batch field {name!r} has shape {array.shape}: its leading axis must split "
                f"evenly over this process's {local_devices} device(s) of the mesh; pad it "
                "to a multiple."
            )
        return jax.make_array_from_process_local_data(sharding, array)

    return jax.tree_util.tree_map_with_path(put, dict(local_batch))


def to_host(tree: Any) -> Any:
    """Copies a pytree of (possibly sharded, multi-process) arrays to numpy on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def failed_processes(failed: bool) -> list[int]:
    """The indices of the processes where `failed` is True, known to every process.

    A collective when there are several processes: every process calls it at the same
    point, so that a failure on one of them stops all of them together instead of
    leaving the others waiting in the next collective.
    """
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(failed))
    return [int(i) for i in np.flatnonzero(flags)]


def shared_problem(problem: str | None, elsewhere: str) -> str | None:
    """The problem every process reports: None when no process has one.

    A collective (see `failed_processes`). A process with a problem reports its own; one
    without reports `elsewhere` with "{process}" replaced by the index of the first that
    has one (a plain replacement: the text may hold braces of its own, in a path say).
    """
    failed = failed_processes(problem is not None)
    if not failed:
        return None
    return problem if problem is not None else elsewhere.replace("{process}", str(failed[0]))
