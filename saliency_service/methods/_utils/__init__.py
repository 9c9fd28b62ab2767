"""Helpers the methods share: baselines, map resizing, SMOE maths, linear heads, prepared torch
programs."""
