"""Trainer callbacks: throughput/memory logging, per-sample gradient collection, projection."""
