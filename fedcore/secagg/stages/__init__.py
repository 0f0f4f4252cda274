"""The four SecAgg+ stages, one file each, a client and a server state per stage."""
