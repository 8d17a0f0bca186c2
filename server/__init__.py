"""Courier's server: the ASGI app, its HTTP and WebSocket endpoints, settings and CLI."""

__version__ = "0.2.0"
