"""Where every byte lives: md's left-symmetric layout and the metadata area.

Left-symmetric (md's default): with n members, stripe s keeps parity on role
p = (n-1) - (s mod n); its data chunks 0..n-2 sit on roles p+1, p+2, ... mod n.
Five members, stripes 0..4:

    role:      0   1   2   3   4
    stripe 0:  D0  D1  D2  D3  P
    stripe 1:  D1  D2  D3  P   D0
    stripe 2:  D2  D3  P   D0  D1
    stripe 3:  D3  P   D0  D1  D2
    stripe 4:  P   D0  D1  D2  D3

Every member has the same metadata area in front of its data:

    offset 0            superblock (one 4 KiB block)
    offset 4096         write-intent bitmap (one 4 KiB block)
    offset 8192         partial-parity log ring (ppl_size bytes)
    then                checksum region: one 4 KiB checksum block per
                        CSUMS_PER_BLOCK data blocks of this member
    data_offset         stripes * chunk_size bytes of chunks (aligned to 1 MiB)
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 4096
SUPERBLOCK_OFFSET = 0
BITMAP_OFFSET = 4096
PPL_OFFSET = 8192
CSUMS_PER_BLOCK = 1020
DATA_ALIGN = 1 << 20
DEFAULT_CHUNK = 64 * 1024
DEFAULT_PPL_SIZE = 4 << 20
MAX_MEMBERS = 32


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    """Array shape: member count, chunk size, chunks per member, metadata sizes."""

    members: int
    chunk_size: int
    stripes: int
    ppl_size: int = DEFAULT_PPL_SIZE

    def __post_init__(self) -> None:
        if not 2 <= self.members <= MAX_MEMBERS:
            raise ValueError(f"members must be 2..{MAX_MEMBERS}, got {self.members}")
        if self.chunk_size < BLOCK or self.chunk_size % BLOCK:
            raise ValueError(f"chunk size must be a multiple of {BLOCK}, got {self.chunk_size}")
        if self.ppl_size % BLOCK or self.ppl_size < 4 * (self.chunk_size + BLOCK):
            raise ValueError(f"ppl size {self.ppl_size} must hold 4 chunk records")

    @classmethod
    def fit(cls, member_size: int, members: int, chunk_size: int = DEFAULT_CHUNK,
            ppl_size: int = DEFAULT_PPL_SIZE) -> "Geometry":
        """The largest geometry whose members fit in `member_size` bytes (the smallest member)."""
        room = member_size - PPL_OFFSET - ppl_size
        stripes = max(0, room * CSUMS_PER_BLOCK // ((CSUMS_PER_BLOCK + 1) * chunk_size))
        while stripes > 0:
            g = cls(members, chunk_size, stripes, ppl_size)
            if g.data_offset + stripes * chunk_size <= member_size:
                return g
            stripes -= 1
        raise ValueError(f"members of {member_size} bytes are too small for chunk {chunk_size}")

    # -- data layout -------------------------------------------------------
    @property
    def data_chunks(self) -> int:
        return self.members - 1

    @property
    def stripe_data_size(self) -> int:
        return self.data_chunks * self.chunk_size

    @property
    def size(self) -> int:
        """Usable bytes of the array."""
        return self.stripes * self.stripe_data_size

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // BLOCK

    def parity_role(self, stripe: int) -> int:
        return (self.members - 1) - (stripe % self.members)

    def data_role(self, stripe: int, index: int) -> int:
        return (self.parity_role(stripe) + 1 + index) % self.members

    def data_index(self, stripe: int, role: int) -> int | None:
        """Which data chunk of `stripe` lives on `role`; None when it holds parity."""
        p = self.parity_role(stripe)
        if role == p:
            return None
        return (role - p - 1) % self.members

    def locate(self, offset: int) -> tuple[int, int, int]:
        """Array offset -> (stripe, data index, offset within the chunk)."""
        chunk, within = divmod(offset, self.chunk_size)
        stripe, index = divmod(chunk, self.data_chunks)
        return stripe, index, within

    def chunk_offset(self, stripe: int) -> int:
        """Member offset of `stripe`'s chunk (same on every member)."""
        return self.data_offset + stripe * self.chunk_size

    # -- metadata area -----------------------------------------------------
    @property
    def data_blocks(self) -> int:
        """4 KiB blocks of chunk data on each member."""
        return self.stripes * self.blocks_per_chunk

    @property
    def csum_offset(self) -> int:
        return PPL_OFFSET + self.ppl_size

    @property
    def csum_blocks(self) -> int:
        return _ceil_div(self.data_blocks, CSUMS_PER_BLOCK)

    @property
    def data_offset(self) -> int:
        end = self.csum_offset + self.csum_blocks * BLOCK
        return _ceil_div(end, DATA_ALIGN) * DATA_ALIGN
