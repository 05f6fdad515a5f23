"""sferd."""
