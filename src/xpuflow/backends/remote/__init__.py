"""Model servers in other processes: OpenAI-compatible servers, the Open Inference Protocol (KServe v2)
over REST and gRPC, and the servers xpuflow starts itself (managed engines)."""
