"""High availability of the head: an active and a passive head (DESIGN.md,
"Two heads"). One module per mechanism; the daemon composes them:

- election: the leader key on an etcd lease (discovery.coord); its create
  revision is the epoch; demotion before the lease can expire
- fencing: `fence_all` asks every member ISU to fence an epoch over the
  control channel; no write before N-1 acknowledgements
- mirror (mirror_frames, mirror_copy): the mapping table's committed journal
  records, sent to the passive synchronously; its durable warm copy
- address: the /32 service address that moves with the active role, with a
  gratuitous ARP; connections and tickle: the old active's client TCP
  connections, listed and reset (tickle ACK) so clients reconnect at once
- service: the composition the daemon runs with head.json's `ha`: passive
  start, the takeover (each step timed into a `timeline`), demotion, switchover
- errors: what these raise
"""
