"""The trainer's exit codes: how the PyTorchJob (restartPolicy ExitCode) tells retry from fail.

Kubeflow's training-operator treats exit codes 1-127 as permanent failures and 128-255 as
retryable, so each code below is chosen for what should happen next, and documented in
``docs/trainer.md``.
"""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0
"""Training finished; the adapter, results file and run manifest are in the object store."""

INTERNAL_ERROR: Final = 1
"""An unexpected error (a bug): permanent, the job fails with an infrastructure error."""

USER_ERROR: Final = 65
"""Bad input the user must fix (bad data, unknown or unloadable model, impossible settings):
permanent, never retried. An error event names the cause (for data: the file and the line)."""

RETRYABLE_ERROR: Final = 129
"""A transient infrastructure failure (object store unreachable, a peer lost): retried, and
the retry resumes from the newest committed checkpoint."""

PREEMPTED: Final = 143
"""SIGTERM received and the checkpoint of the current step committed (128 + SIGTERM): retried,
and the retry resumes exactly where this run stopped."""

RETRYABLE: Final = frozenset({RETRYABLE_ERROR, PREEMPTED})
