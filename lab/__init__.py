"""The lab runner: composition root that starts ISUs and heads on one machine
(processes on loopback, or hosts in network namespaces) for `opie lab up` and tests."""
