"""Opie's RAID5 engine: a pure engine over abstract async members.

Public entry points:

* `raid5.assemble.create(members, ...)` / `raid5.assemble.assemble(members, ...)`
  give an `raid5.engine.Array`, itself a block device: `size`, `read`,
  `write(fua=)`, `flush`, plus `state_string()` ('UU_UU') and `status()`.
* `raid5.recovery.replace(array, member)` rebuilds onto a replacement and
  `raid5.recovery.re_add(array, member)` takes back a member that was away
  (resyncing only what it missed); both run in the background.
* `raid5.scrub.scrub(array)` checks every block and returns a `ScrubReport`.
* `raid5.member.Member` is the protocol members satisfy; `MemoryMember` and
  `FileMember` are provided; `nbd.client.NBDClient` fits without an import.

Module map: geometry (layout), plan (stripe plans as data), stripe (the
executor) and stripe_array (what it needs of the array), engine (the array,
bitmap, member state), shield (stripe updates run to their end), superblock /
bitmap / ppl / checksums (on-disk records), ring (the log ring), recovery
(crash resync, rebuild, re-add), scrub, phases (state machines), locks,
parity, stats, member, errors, testing (fault injection for tests and
benchmarks).
"""
