"""Pictures for people: overlays, colour bars, panels and LOVI pictures."""
