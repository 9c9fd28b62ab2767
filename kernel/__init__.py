"""The transport-free bottom layer: model handles, requests, results, costs and errors."""
