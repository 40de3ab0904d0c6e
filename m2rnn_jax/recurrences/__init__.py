"""Baseline recurrences (Gated DeltaNet, Mamba-2): each an op with a step-by-step reference."""
