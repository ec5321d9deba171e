"""What the server and the tuner share on disk, so that neither imports the other (docs/architecture.md):
the base model's resolution and fingerprint, the adapter root's names and paths, and its manifest.json;
the held-out text set behind every quality figure (heldout.py: loadtest scores it, the server too).
A request's budget (budget.py: the server's router reads it, load campaigns send it).
Torch-free at import; `model.resolve_model` imports torch/transformers only to convert the default model."""
