"""Runtimes that run a quantized Kanana model on a CPU."""
