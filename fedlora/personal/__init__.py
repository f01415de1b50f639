"""Per-client evaluation: each client's local test split, summaries across clients."""
