"""effalg methods for diffusers."""
