"""Typed messages over ZeroMQ: codecs, channels, request/reply correlation, uncopied frames.

Knows nothing of requests, blocks or policies: it moves `msgspec` Structs of one tagged union per
channel direction, plus optional raw buffers (tensors) as extra frames.
"""
