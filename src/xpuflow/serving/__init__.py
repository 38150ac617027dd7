"""The HTTP gateway: OpenAI-compatible API, auth, metrics, dashboard and admin API."""
