"""Bytes from flash, nothing about models: the reader, request planning, the I/O profile, OS helpers."""
