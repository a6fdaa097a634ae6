"""Low-bit compute for effalg."""
