"""Data: geometric transforms that carry landmarks exactly, and the multi-view SSL transforms."""
