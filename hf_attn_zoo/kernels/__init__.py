"""Attention kernels and the `zoo` attention dispatcher (no method logic here)."""
