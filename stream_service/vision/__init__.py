"""Kernels and the per-frame inspection: arrays in, arrays out; no sockets, cameras, files, clocks or processes."""
