"""Workers: priority queues, adaptive micro-batching, QoS contexts, admission, model residency."""
