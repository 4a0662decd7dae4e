"""Left-symmetric layout and metadata placement against hand-computed tables."""

import pytest

from opie.raid5.geometry import BLOCK, CSUMS_PER_BLOCK, DATA_ALIGN, PPL_OFFSET, Geometry

# Role of data chunk i, per stripe, and the parity role: md left-symmetric, computed by hand.
# n = 3:  stripe 0: D0 D1 P | stripe 1: D1 P D0 | stripe 2: P D0 D1
N3 = {0: ([0, 1], 2), 1: ([2, 0], 1), 2: ([1, 2], 0), 3: ([0, 1], 2)}
# n = 4:  parity walks 3, 2, 1, 0; data starts right after parity and wraps.
N4 = {0: ([0, 1, 2], 3), 1: ([3, 0, 1], 2), 2: ([2, 3, 0], 1), 3: ([1, 2, 3], 0),
      4: ([0, 1, 2], 3), 5: ([3, 0, 1], 2)}
# n = 5: the table in raid5/geometry.py's docstring.
N5 = {0: ([0, 1, 2, 3], 4), 1: ([4, 0, 1, 2], 3), 2: ([3, 4, 0, 1], 2),
      3: ([2, 3, 4, 0], 1), 4: ([1, 2, 3, 4], 0)}
N2 = {0: ([0], 1), 1: ([1], 0), 2: ([0], 1)}


@pytest.mark.parametrize("members,table", [(2, N2), (3, N3), (4, N4), (5, N5)])
def test_left_symmetric_table(members, table):
    g = Geometry(members, 65536, 100)
    for stripe, (data_roles, parity) in table.items():
        assert g.parity_role(stripe) == parity
        assert [g.data_role(stripe, i) for i in range(members - 1)] == data_roles
        assert g.data_index(stripe, parity) is None
        for i, role in enumerate(data_roles):
            assert g.data_index(stripe, role) == i


@pytest.mark.parametrize("offset,expected", [
    (0, (0, 0, 0)),
    (65535, (0, 0, 65535)),
    (65536, (0, 1, 0)),
    (4 * 65536 + 5, (1, 0, 5)),          # 5 members: 4 data chunks per stripe
    (9 * 65536 + 100, (2, 1, 100)),
])
def test_locate_five_members(offset, expected):
    assert Geometry(5, 65536, 100).locate(offset) == expected


def test_sizes_follow_smallest_member_and_metadata():
    g = Geometry.fit(64 << 20, 5, 65536, ppl_size=1 << 20)
    assert g.data_offset % DATA_ALIGN == 0
    assert g.data_offset >= PPL_OFFSET + g.ppl_size + g.csum_blocks * BLOCK
    assert g.data_offset + g.stripes * 65536 <= 64 << 20
    # one more stripe would not fit
    bigger = Geometry(5, 65536, g.stripes + 1, 1 << 20)
    assert bigger.data_offset + bigger.stripes * 65536 > 64 << 20
    assert g.size == g.stripes * 4 * 65536
    assert g.csum_blocks == -(-g.stripes * 16 // CSUMS_PER_BLOCK)
    # by hand: 8 KiB + 1 MiB log + 16 checksum blocks round up to a 2 MiB data offset,
    # and (64 MiB - 2 MiB) / 64 KiB = 992 stripes
    assert (g.data_offset, g.stripes, g.csum_blocks) == (2 << 20, 992, 16)


@pytest.mark.parametrize("kwargs", [dict(members=1, chunk_size=65536, stripes=1),
                                    dict(members=33, chunk_size=65536, stripes=1),
                                    dict(members=3, chunk_size=1000, stripes=1),
                                    dict(members=3, chunk_size=65536, stripes=1, ppl_size=8192)])
def test_bad_geometry_refused(kwargs):
    with pytest.raises(ValueError):
        Geometry(**kwargs)
