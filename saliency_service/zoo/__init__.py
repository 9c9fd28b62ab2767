"""The shipped models' architectures and their training."""
