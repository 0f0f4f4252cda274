"""SecAgg+ secure aggregation: cryptographic building blocks and per-stage state machines."""
