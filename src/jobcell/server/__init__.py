"""The HTTP server: REST API with users and tokens, OGC API - Processes, web dashboard."""

from jobcell.server.app import create_app

__all__ = ["create_app"]
