"""kubetune's Kubernetes operator (kopf): FineTuneJob → PyTorchJob → served adapter.

Handlers are thin; manifests and status mappings are pure functions, unit-tested without a
cluster. Imports ``kubetune`` and no other component.
"""
