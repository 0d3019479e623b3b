"""Shared, torch-free pieces: config, Redis names, wire format, stream I/O, tasks and rewards."""
