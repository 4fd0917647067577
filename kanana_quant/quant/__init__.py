"""Quantizers (RTN, GPTQ, AWQ), the integer grid they share, and packing to checkpoint layouts."""
