"""High availability of the head: an active and a passive head (DESIGN.md,
"Two heads"). One module per mechanism, composed by the daemon:

- election: the leader key on an etcd lease; its create revision is the epoch
- mirror: the mapping table's journal records, sent to the passive synchronously
- address: the service address that moves with the active role (/32,
  gratuitous ARP) and the reset of the old active's client connections
"""
