"""One folder per op."""
