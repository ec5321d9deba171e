"""Adapter versions on disk and in the engine: validation, private snapshots, the registry, AdapterService.

Where to look:
  validate.py  an adapter folder against the served base (config, manifest, safetensors headers) — no torch
  snapshot.py  the private copy the engine loads, validated again, removed when the version leaves
  registry.py  which versions are resident, leases per request, load / unload / pin / LRU eviction
  service.py   AdapterService: gRPC <-> registry
Paths inside the adapter root and manifest.json live in common/ (adapter_paths.py, manifest.py), shared with
the tuner.
"""
