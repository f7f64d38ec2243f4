"""The OpenAI-compatible HTTP surface: bodies in, chunks out; imports `cluster`, not `admin`."""
