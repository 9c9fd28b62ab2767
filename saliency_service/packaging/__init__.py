"""Model packages: export from PyTorch, import of foreign ONNX files, graph reading, package
files, and the shipped packages."""
