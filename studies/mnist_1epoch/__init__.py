"""The 1-epoch MNIST study of issue #5 (see README.md here)."""
