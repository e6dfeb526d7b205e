"""Where FineTuneJobs live: Kubernetes custom resources, or a local SQLite database."""
