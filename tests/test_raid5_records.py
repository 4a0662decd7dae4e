"""On-disk records round-trip, sit where their layout comments say, and fail
with IntegrityError("... expected X, got Y") when damaged."""

import os
import struct

import pytest

from opie.raid5.bitmap import BitmapRecord
from opie.raid5.checksums import UNKNOWN, ChecksumBlock, block_tag, block_tags
from opie.raid5.errors import IntegrityError
from opie.raid5.geometry import BLOCK, CSUMS_PER_BLOCK
from opie.raid5.ppl import PPLRecord
from opie.raid5.superblock import MemberState, Superblock


def superblock():
    return Superblock(array_uuid=os.urandom(16), member_uuid=os.urandom(16), role=2, members=4,
                      chunk_size=65536, region_stripes=8, ppl_size=1 << 20, events=77,
                      stripes=1000, recovery_stripe=123, scrub_stripe=5, ppl_generation=9,
                      role_states=(MemberState.IN_SYNC, MemberState.FAULTY,
                                   MemberState.REBUILDING, MemberState.RESYNCING),
                      role_uuids=tuple(os.urandom(16) for _ in range(4)), clean=True)


def test_superblock_round_trip_and_layout():
    sb = superblock()
    raw = sb.to_bytes()
    assert len(raw) == BLOCK
    assert Superblock.from_bytes(raw) == sb
    assert raw[:4] == b"OPR5"
    assert struct.unpack_from("<H", raw, 40)[0] == 2          # role
    assert struct.unpack_from("<Q", raw, 56)[0] == 77         # events
    assert struct.unpack_from("<Q", raw, 72)[0] == 123        # recovery stripe
    assert raw[96:100] == bytes([1, 2, 3, 4])                # role states
    assert raw[128:144] == sb.role_uuids[0]


@pytest.mark.parametrize("at,what", [(0, "magic"), (4, "version"), (60, "crc32")])
def test_superblock_damage_is_named(at, what):
    raw = bytearray(superblock().to_bytes())
    raw[at] ^= 0xFF
    with pytest.raises(IntegrityError, match=f"superblock {what}: expected .*, got"):
        Superblock.from_bytes(bytes(raw))


def test_bitmap_round_trip_and_damage():
    rec = BitmapRecord.from_regions(5, 1234, 8, 100, {0, 7, 8, 99})
    raw = rec.to_bytes()
    assert len(raw) == BLOCK and raw[:4] == b"O5BM"
    back = BitmapRecord.from_bytes(raw)
    assert back.dirty_regions() == [0, 7, 8, 99]
    assert struct.unpack_from("<Q", raw, 16)[0] == 1234       # retired seq
    assert raw[32] == 0b10000001 and raw[33] == 1             # bits LSB first from byte 32
    bad = bytearray(raw)
    bad[30] ^= 1
    with pytest.raises(IntegrityError, match="bitmap crc32"):
        BitmapRecord.from_bytes(bytes(bad))


def test_ppl_record_round_trip_and_damage():
    uuid = os.urandom(16)
    rec = PPLRecord(uuid, 3, 42, 17, 2, 4, ((2, 6), (0, 0), (3, 4)), False, 1234, ((0, 2), (2, 3)))
    raw = rec.to_bytes()
    assert raw[:4] == b"O5PL" and rec.length == (1 + 4 + 2) * BLOCK
    assert PPLRecord.from_bytes(raw, 3) == rec
    assert struct.unpack_from("<QQ", raw, 40) == (42, 17)
    assert raw[180] == 2 and struct.unpack_from("<4H", raw, 184) == (0, 2, 2, 3)
    full = PPLRecord(uuid, 3, 43, 17, 0, 4, ((0, 4),) * 3, True, 0, done=True)
    assert full.length == BLOCK and PPLRecord.from_bytes(full.to_bytes(), 3) == full
    assert struct.unpack_from("<H", full.to_bytes(), 6)[0] == 3          # FULL | DONE
    bad = bytearray(raw)
    bad[50] ^= 4
    with pytest.raises(IntegrityError, match="ppl header crc32"):
        PPLRecord.from_bytes(bytes(bad), 3)
    with pytest.raises(IntegrityError, match="ppl payload crc32"):
        rec.check_payload(b"x" * 4 * BLOCK)


def test_checksum_block_round_trip_zero_and_damage():
    entries = tuple(range(1, CSUMS_PER_BLOCK + 1))
    raw = ChecksumBlock(7, entries).to_bytes()
    assert len(raw) == BLOCK and raw[:4] == b"O5CS"
    assert ChecksumBlock.from_bytes(raw, 7).entries == entries
    assert struct.unpack_from("<I", raw, 16)[0] == 1
    assert ChecksumBlock.from_bytes(bytes(BLOCK), 3).entries == (UNKNOWN,) * CSUMS_PER_BLOCK
    with pytest.raises(IntegrityError, match="checksum block index: expected 8, got 7"):
        ChecksumBlock.from_bytes(raw, 8)
    bad = bytearray(raw)
    bad[2000] ^= 1
    with pytest.raises(IntegrityError, match="checksum block crc32"):
        ChecksumBlock.from_bytes(bytes(bad), 7)


def test_block_tag_never_unknown():
    assert block_tag(bytes(BLOCK)) != UNKNOWN


def test_block_tags_are_zlib_crc32_whatever_library_computes_them():
    """The stored tag is zlib's CRC-32 (0 stored as 1), so checksum blocks
    written with either implementation (ISA-L or zlib) read back the same."""
    import zlib
    data = os.urandom(64 * BLOCK) + bytes(BLOCK)
    want = [zlib.crc32(data[i:i + BLOCK]) or 1 for i in range(0, len(data), BLOCK)]
    assert block_tags(data) == want
    assert [block_tag(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)] == want
