"""The cluster's state and the mechanisms that change it; imports no other room, no aiohttp web."""
