"""Kernel implementations. ``reference`` holds the pure-PyTorch twin of every op."""
