"""The mesh's device order: what the pipeline's per-process item slots rely on."""

from types import SimpleNamespace

import jax

from mmrec_jax import sharding


def test_mesh_devices_are_grouped_by_process_in_process_order():
    # As a multi-host runtime may list them: processes interleaved.
    devices = [SimpleNamespace(process_index=p, id=i) for i, p in enumerate([1, 0, 1, 0, 2, 0])]
    ordered = [(d.process_index, d.id) for d in sharding.by_process(devices)]
    assert ordered == [(0, 1), (0, 3), (0, 5), (1, 0), (1, 2), (2, 4)]
    # One process: the order given is kept.
    reverse = jax.devices()[::-1]
    assert list(sharding.make_mesh(reverse).devices) == reverse


def test_every_process_reports_one_problem_from_where_it_arose():
    # One process: its own problem, or none.
    assert sharding.shared_problem(None, "process {process} failed") is None
    assert sharding.shared_problem("disk full", "process {process} failed") == "disk full"
