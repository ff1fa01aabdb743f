"""The paper's experiments: its models, the MNIST reader, the training loop, Table 2 and the demo.

Built on the public API; nothing in ``format``/``method``/``api`` imports from here.
"""
