"""``secured-endpoint-operator run`` (and ``--version``). The development harness has its own CLI, ``sep-devenv``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from secured_endpoint import __version__
from secured_endpoint.settings import SettingsError, load_redis_settings, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secured-endpoint-operator",
                                     description="Fresh OAuth 2.0 access tokens for API gateways.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the operator against the current kubeconfig or in-cluster")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs like 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                     help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    run.add_argument("--liveness", metavar="URL", default=None,
                     help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("-v", "--verbose", action="store_true", help="log more")

    args = parser.parse_args(argv)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
        redis_settings = load_redis_settings()
    except SettingsError as exc:
        print(f"secured-endpoint-operator: {exc}", file=sys.stderr)
        return 2
    if not args.all_namespaces and not args.namespace:
        print("secured-endpoint-operator: name namespaces with --namespace, or use --all-namespaces",
              file=sys.stderr)
        return 2
    # Imported only now: settings errors and --help stay fast and need no kopf.
    from secured_endpoint import wiring

    return wiring.run(settings, redis_settings, all_namespaces=args.all_namespaces, namespaces=args.namespace,
                      kubeconfig=args.kubeconfig, liveness=args.liveness, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
