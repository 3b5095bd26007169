"""Example tasks: ``digits`` (scikit-learn digits, lower and upper halves)."""
