"""cpfx graph passes, one per file."""
