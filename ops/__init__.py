"""Operator tooling: the `localq` command that starts and inspects a deployment."""
