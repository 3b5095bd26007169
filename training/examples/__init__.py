"""Example tasks: ``digits`` (scikit-learn digits, lower and upper halves) and ``minilm`` (sentence topics on the pre-trained MiniLM encoder)."""
