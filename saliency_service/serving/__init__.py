"""The serving runtime: configuration, start-up and shutdown, admission, warm-up, the engine,
metrics and logs."""
