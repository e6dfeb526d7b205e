"""kubetune's Kubernetes operator (kopf): FineTuneJob → TrainJob or PyTorchJob → served model.

Handlers are thin; manifests and status mappings are pure functions, unit-tested without a
cluster. Imports ``kubetune`` and no other component.
"""
