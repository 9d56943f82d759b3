"""Serving one base model with many adapters: sources, the adapter cache, the batching engine, the HTTP API, deploys."""
