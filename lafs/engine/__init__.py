"""Shared training engine: schedules, EMA, clipping, optimizer groups, checkpoints, the SSL step."""
