"""``python -m kubetune_operator``: run the operator (kopf) on the configured namespace.

Settings come from ``KUBETUNE_*`` variables (see ``kubetune.settings``); the cluster from the
in-cluster service account, or ``KUBECONFIG``. Without ``KUBETUNE_OPERATOR__PEERING`` the
operator runs standalone and exactly one replica must run; with it, replicas take part in
kopf's peering and all but the highest-priority one pause.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Sequence

import kopf

from kubetune.settings import Settings
from kubetune_operator.context import OperatorContext
from kubetune_operator.handlers import register
from kubetune_operator.kube import KubeClient
from kubetune_runtime.objectstore import open_object_store

log = logging.getLogger("kubetune_operator")

# Random priorities make a tie (which pauses every replica until one goes away) unlikely.
PRIORITY_RANGE = (1, 1_000_000)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (each overrides the matching setting)."""
    parser = argparse.ArgumentParser(prog="kubetune_operator", description=__doc__)
    parser.add_argument("--standalone", action="store_true", help="Ignore peering settings.")
    parser.add_argument("--peering", help="kopf peering object name (KopfPeering).")
    parser.add_argument("--priority", type=int, help="Peering priority of this replica.")
    parser.add_argument("--verbose", action="store_true", help="Debug logging.")
    return parser.parse_args(argv)


def api_client(settings: Settings) -> object:
    """A kubernetes ApiClient from the settings' kubeconfig, KUBECONFIG, or the pod's account."""
    from kubernetes import client, config

    if settings.kubernetes.kubeconfig is not None:
        return config.new_client_from_config(config_file=str(settings.kubernetes.kubeconfig))  # type: ignore[no-untyped-call]
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        return config.new_client_from_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def build_context(settings: Settings) -> OperatorContext:
    """The store, Kubernetes client and metrics the handlers share."""
    store = open_object_store(settings.object_store, root=settings.store_root())
    return OperatorContext(settings=settings, store=store, kube=KubeClient(api_client(settings)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the operator until SIGTERM/SIGINT."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kubernetes' and urllib3's debug output would echo bearer tokens.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    settings = Settings()
    opts = settings.operator
    peering = None if args.standalone else (args.peering or opts.peering)
    priority = args.priority if args.priority is not None else opts.peering_priority
    if peering is not None and priority is None:
        priority = random.randint(*PRIORITY_RANGE)  # noqa: S311 - not a secret
    ctx = build_context(settings)
    registry = kopf.OperatorRegistry()
    register(registry, ctx)
    namespace = settings.kubernetes.namespace
    log.info(
        "kubetune operator: namespace %s, %s",
        namespace,
        f"peering {peering!r} priority {priority}" if peering else "standalone",
    )
    kopf.run(
        registry=registry,
        namespaces=[namespace],
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
