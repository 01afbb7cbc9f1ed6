"""Data sources, the prepare and augment stages, and readers of what they write."""
