"""kubetune's shared runtime: what the components run on top of the contract (``kubetune``).

The object store, the dataset validator, the job driver and its lifecycle decisions, webhooks,
the adapter registry that serves fine-tuned models on vLLM, and the vLLM launcher. It imports
the contract and its own optional dependency group (``pip install kubetune[runtime]``), never a
component; the components (API, operator, trainer, CLI, local mode) import it.
"""
