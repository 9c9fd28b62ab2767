"""The transport-free bottom layer: model repository and handles, requests, results, costs,
errors and typed parameters. Imports no transport, no method and no server code."""
