"""Autograd Functions, torch custom-op registration and backend dispatch; one file per op."""
