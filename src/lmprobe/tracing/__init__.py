"""The language model: loading it, tracing it with nnsight, pooling and storing its activations."""
