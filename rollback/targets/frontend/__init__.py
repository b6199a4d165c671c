"""The frontend target: immutable static releases, an atomic switch of the live one, checked before it goes live."""
