"""Measuring: perplexity, bench (and its worker processes), plots, memory cgroups."""
