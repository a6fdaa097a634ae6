"""effalg methods for transformers."""
