"""Adapter versions on disk and in the engine: paths, manifests, validation, the registry, AdapterService."""
