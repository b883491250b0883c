"""Pure tensor math of merging (methods, sparsifiers) and the streaming merge engine."""
