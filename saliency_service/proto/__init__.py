"""The public API ``saliency.v1`` (``explainer.proto``) and its generated Python stubs."""
