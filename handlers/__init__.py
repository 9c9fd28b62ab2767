"""Explanation methods, one module per family; ``handlers.registry`` maps method → handler."""
