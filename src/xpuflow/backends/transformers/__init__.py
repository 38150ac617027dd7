"""Hugging Face transformers: the plugin, its session (static and continuous batching) and the KV-cache
keyword of the installed version."""
