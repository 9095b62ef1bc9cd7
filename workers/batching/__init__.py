"""Continuous batching for the llama-cpp backend: one context, many sequences decoded together."""
