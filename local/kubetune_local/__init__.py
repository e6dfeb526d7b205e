"""kubetune's local mode: the whole service on one machine (``make run``, ``kubetune serve``).

The composition root: it builds the API (``kubetune_api``), the job driver with the subprocess
runtime (trainers as child processes, ``kubetune_trainer``), and a vLLM on the CPU, and runs
them until Ctrl-C. Imports nothing heavy here: ``python -m kubetune_local`` starts it.
"""
