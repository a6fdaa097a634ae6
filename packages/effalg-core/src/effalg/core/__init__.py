"""Method-independent pieces of effalg."""
