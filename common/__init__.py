"""Shared vocabulary of mell: ids, configs, errors, sampling parameters, logging setup.

Pure Python. Nothing here imports torch, zmq or aiohttp.
"""
