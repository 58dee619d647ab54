"""The (LLM size N x visual tokens V) grid: specification, the per-cell runner, backends, results table."""
