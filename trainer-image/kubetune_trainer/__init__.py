"""kubetune's trainer: the entrypoint ``torchrun`` starts inside the PyTorchJob's pods.

Reads the resolved config, trains with transformers + TRL + PEFT, and writes events,
checkpoints and the final adapter to the object store. Imports ``kubetune`` and no other
component.
"""
