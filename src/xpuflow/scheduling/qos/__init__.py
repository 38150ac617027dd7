"""QoS: contexts with memory budgets, admission, the gateway's gate, model residency and device
partitions (docs/qos.md)."""
