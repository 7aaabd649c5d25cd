"""Adapter banks: many adapters of one base model and method served from one graph (numpy only)."""
