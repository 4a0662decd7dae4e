"""Stripe write plans, table-driven: mode chosen and bytes read, with no I/O."""

import pytest

from opie.raid5.geometry import Geometry
from opie.raid5.plan import Extent, WriteMode, plan_read, plan_write, run_layout

K = 4096
G = Geometry(5, 16 * K, 10)          # 4 data chunks of 64 KiB; stripe 0: D0..D3 on roles 0..3, P on 4
NONE = (0, 0)
FULL = (0, 16 * K)


def mods(*ranges):
    return tuple(ranges) + (NONE,) * (4 - len(ranges))


CASES = [
    # name, modified ranges, missing role, mode, bytes read, log record
    ("whole stripe", (FULL, FULL, FULL, FULL), None, WriteMode.FULL_STRIPE, 0, False),
    ("first rows of every chunk", ((0, K),) * 4, None, WriteMode.FULL_STRIPE, 0, False),
    ("one block of one chunk: rmw reads old block + parity block",
     mods((0, K)), None, WriteMode.READ_MODIFY_WRITE, 2 * K, True),
    ("three whole chunks: rcw reads the fourth",
     (FULL, FULL, FULL, NONE), None, WriteMode.RECONSTRUCT_WRITE, 16 * K, True),
    ("two whole chunks: rmw 3 chunks vs rcw 2 chunks",
     (FULL, FULL, NONE, NONE), None, WriteMode.RECONSTRUCT_WRITE, 32 * K, True),
    ("sub-block write: rmw reads the block and parity",
     mods((100, 200)), None, WriteMode.READ_MODIFY_WRITE, 2 * K, True),
    ("unaligned full stripe: only edge blocks are read, and logged",
     ((10, 16 * K), FULL, FULL, (0, 16 * K - 10)), None, WriteMode.FULL_STRIPE, 2 * K, True),
    ("parity member missing: data only, edges read",
     mods((100, 5000)), 4, WriteMode.DATA_ONLY, 2 * K, False),
    ("untouched data member missing: rmw",
     (FULL, FULL, FULL, NONE), 3, WriteMode.READ_MODIFY_WRITE, 4 * 16 * K, True),
    ("written member missing: read every survivor over the window",
     mods((0, 2 * K)), 0, WriteMode.DEGRADED_WRITE, 4 * 2 * K, True),
]


@pytest.mark.parametrize("name,modified,missing,mode,read,log", CASES, ids=[c[0] for c in CASES])
def test_write_plan(name, modified, missing, mode, read, log):
    plan = plan_write(G, 0, modified, missing)
    assert plan.mode is mode
    assert plan.read_bytes == read
    assert plan.log is log
    assert all(e.role != missing for e in plan.reads)
    assert plan.parity_role == 4


def test_rmw_reads_exactly_modified_blocks_and_parity_window():
    plan = plan_write(G, 0, mods((K, 3 * K)))
    assert plan.window == (K, 3 * K)
    assert set(plan.reads) == {Extent(0, K, 2 * K), Extent(4, K, 2 * K)}


def test_rcw_reads_untouched_parts_of_window():
    plan = plan_write(G, 0, (FULL, FULL, (0, 8 * K), NONE))
    assert plan.mode is WriteMode.RECONSTRUCT_WRITE
    assert set(plan.reads) == {Extent(2, 8 * K, 8 * K), Extent(3, 0, 16 * K)}


def test_full_write_of_a_logged_stripe_supersedes_its_record():
    assert plan_write(G, 0, (FULL,) * 4, logged=True).log is True


def test_stripe_one_uses_rotated_roles():
    # stripe 1: parity on role 3, D0 on role 4
    plan = plan_write(G, 1, mods((0, K)))
    assert plan.parity_role == 3
    assert set(plan.reads) == {Extent(4, 0, K), Extent(3, 0, K)}


def test_nothing_to_write_is_an_error():
    with pytest.raises(ValueError):
        plan_write(G, 0, mods())


@pytest.mark.parametrize("missing,reconstruct,sources", [
    (None, False, [1]), (2, False, [1]), (1, True, [0, 2, 3, 4])])
def test_read_plan(missing, reconstruct, sources):
    plan = plan_read(G, 0, 1, 100, 5000, missing)
    assert (plan.lo, plan.hi) == (0, 2 * K)
    assert plan.reconstruct is reconstruct
    assert plan.sources(G) == sources


def test_run_layout_five_members():
    # stripes 0..4 of the geometry docstring's table; -1 = parity
    assert run_layout(G, 0, 5) == [[0, 1, 2, 3, -1],
                                   [1, 2, 3, -1, 0],
                                   [2, 3, -1, 0, 1],
                                   [3, -1, 0, 1, 2],
                                   [-1, 0, 1, 2, 3]]
    assert run_layout(G, 3, 2) == [[3, -1], [-1, 0], [0, 1], [1, 2], [2, 3]]
