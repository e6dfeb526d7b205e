"""``python -m kubetune_api``: serve the API."""

from kubetune_api.app import main

main()
