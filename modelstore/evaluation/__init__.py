"""Checking a stored task against its original: its outputs (`modelstore eval`) and its
weights (`modelstore verify`)."""
