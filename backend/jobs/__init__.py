"""Whole-project pre-label jobs: planning (prelabel), work items (work), executors (local, rq)."""
