"""Capacity detection and admission (a pure function of capacity, leases and queue)."""
