"""xpuflow."""
