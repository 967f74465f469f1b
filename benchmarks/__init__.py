"""Benchmarks against diffusers / peft (not tests: nothing is asserted). Run from the repository root."""
