"""Models: the registry (names, facts, tokenizers; no torch) and loading (torch)."""
