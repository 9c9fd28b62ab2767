"""Explanation methods, one file each (helpers in ``_utils``); ``registry`` maps a method name
to its handler."""
