"""HTTP routes: parse the request, call a service, return a protocol model. Nothing else."""
