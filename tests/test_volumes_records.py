"""On-disk records: round trips, and hostile bytes fail only with IntegrityError."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opie.head.volumes import IntegrityError, MemoryDevice, Pool, ValidationError
from opie.head.volumes.layout import Geometry
from opie.head.volumes.records import (KIND_CATALOG, KIND_SNAPSHOT, KIND_TABLE, META_BLOCK,
                                  CatalogRecord, JournalHeader, Superblock, page_from_bytes,
                                  page_to_bytes)

SB = Superblock(slot=1, generation=7, pool_uuid=uuid.uuid4(), device_size=1 << 30,
                segment_size=1 << 20, catalog_pages=34, table_pages=9, journal_blocks=256,
                segment_count=1000, journal_seq=42)


def test_superblock_round_trip_and_every_flipped_byte_is_caught() -> None:
    raw = SB.to_bytes()
    assert len(raw) == META_BLOCK
    assert Superblock.from_bytes(raw) == SB
    for i in range(84):   # every byte of the fields and the crc
        bad = bytearray(raw)
        bad[i] ^= 0x5A
        with pytest.raises(IntegrityError):
            Superblock.from_bytes(bytes(bad))
    with pytest.raises(IntegrityError, match="expected b'OPIEPOOL'"):
        Superblock.from_bytes(bytes(META_BLOCK))
    with pytest.raises(IntegrityError, match="length"):
        Superblock.from_bytes(raw[:100])


VALID = [SB.to_bytes(), page_to_bytes(KIND_TABLE, 3, b"entries"),
         JournalHeader(5, SB.pool_uuid, (1, 2)).to_bytes(bytes(2 * META_BLOCK)),
         CatalogRecord(KIND_SNAPSHOT, 3, 1, 4096, 2, 0.0, "s").to_bytes().ljust(META_BLOCK, b"\0")]


@settings(max_examples=300)
@given(st.sampled_from(VALID), st.integers(0, META_BLOCK - 1), st.binary(min_size=1, max_size=48))
def test_hostile_bytes_fail_only_with_integrity_error(valid: bytes, at: int, junk: bytes) -> None:
    block = bytearray(valid)
    block[at:at + len(junk)] = junk
    block = block[:len(valid)]
    for parse in (lambda b: Superblock.from_bytes(b[:META_BLOCK]),
                  lambda b: page_from_bytes(KIND_TABLE, 3, b[:META_BLOCK]),
                  JournalHeader.from_bytes,
                  lambda b: CatalogRecord.from_bytes(b[:128])):
        try:
            parse(bytes(block))
        except IntegrityError:
            pass


def test_page_frame_checks_kind_number_and_crc() -> None:
    page = page_to_bytes(KIND_CATALOG, 5, b"payload")
    assert page_from_bytes(KIND_CATALOG, 5, page)[:7] == b"payload"
    with pytest.raises(IntegrityError, match="kind"):
        page_from_bytes(KIND_TABLE, 5, page)
    with pytest.raises(IntegrityError, match="page_no"):
        page_from_bytes(KIND_CATALOG, 6, page)
    bad = bytearray(page)
    bad[2000] ^= 1
    with pytest.raises(IntegrityError, match="crc32"):
        page_from_bytes(KIND_CATALOG, 5, bytes(bad))


def test_journal_transaction_round_trip_and_torn_tail() -> None:
    pages = tuple(range(0, 2000, 2))                # header spans several blocks
    images = b"".join(bytes([p % 251]) * META_BLOCK for p in range(len(pages)))
    header = JournalHeader(9, SB.pool_uuid, pages)
    txn = header.to_bytes(images)
    assert len(txn) == header.nblocks * META_BLOCK
    got, got_images = JournalHeader.from_bytes(txn)
    assert got == header and got_images == images
    torn = txn[:-512] + bytes(512)
    with pytest.raises(IntegrityError, match="crc32"):
        JournalHeader.from_bytes(torn)


def test_catalog_record_round_trip_and_bad_fields() -> None:
    rec = CatalogRecord(KIND_SNAPSHOT, 3, 1, 1 << 30, 17, 1.5e9, "nightly-2026.11.21")
    assert CatalogRecord.from_bytes(rec.to_bytes()) == rec
    bad = bytearray(rec.to_bytes())
    bad[0] = 9
    with pytest.raises(IntegrityError, match="kind"):
        CatalogRecord.from_bytes(bytes(bad))
    bad = bytearray(rec.to_bytes())
    bad[36] = 0xFF
    with pytest.raises(IntegrityError, match="utf-8"):
        CatalogRecord.from_bytes(bytes(bad))


def test_geometry_refuses_what_cannot_work() -> None:
    for kwargs in ({"segment_size": 3000}, {"segment_size": 12288}, {"max_entries": 0},
                   {"journal_blocks": 1}):
        args = {"device_size": 1 << 26, "segment_size": 1 << 20, "max_entries": 64} | kwargs
        with pytest.raises(ValidationError):
            Geometry.plan(**args)
    with pytest.raises(ValidationError, match="no room"):
        Geometry.plan(64 * 1024, 64 * 1024, 31)
    geo = Geometry.plan(1 << 30, 1 << 20, 1024)
    assert geo.data_start % (1 << 20) == 0
    assert geo.data_start + geo.segment_count * (1 << 20) <= 1 << 30


def test_damaged_superblocks_and_pages_on_open() -> None:
    async def body() -> None:
        dev = MemoryDevice(2 << 20)
        pool = await Pool.format(dev, segment_size=16384, max_entries=31)
        await pool.create_volume("v", 65536)
        await pool.open_volume("v").write(0, b"x" * 100, fua=True)
        await pool.close()                      # checkpoint: pages in place, slot 1 newest
        image = bytes(dev.buf)
        # one damaged slot: the other one is used
        for slot in (0, 1):
            dev.buf[:] = image
            dev.buf[slot * META_BLOCK + 20] ^= 1
            again = await Pool.open(dev)
            assert await again.open_volume("v").read(0, 100) == b"x" * 100
        # both damaged: refuse, saying why
        dev.buf[:] = image
        dev.buf[20] ^= 1
        dev.buf[META_BLOCK + 20] ^= 1
        with pytest.raises(IntegrityError, match="no valid superblock"):
            await Pool.open(dev)
        # the newest slot damaged after later commits: the journal shows they
        # came after it, so they are replayed and nothing is lost
        dev.buf[:] = image
        pool = await Pool.open(dev)
        await pool.open_volume("v").write(16384, b"later", fua=True)
        dev.buf[META_BLOCK + 20] ^= 1
        again = await Pool.open(dev)
        assert await again.open_volume("v").read(16384, 5) == b"later"
        assert again.check().problems == []
        # a damaged metadata page that no journal transaction repairs
        dev.buf[:] = image
        dev.buf[2 * META_BLOCK + 100] ^= 1
        with pytest.raises(IntegrityError, match="metadata page 0 crc32"):
            await Pool.open(dev)
    asyncio.run(body())
