"""``secured-endpoint-operator run | demo | build-control-plane``."""

from __future__ import annotations

import argparse
import logging
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

    demo = commands.add_parser("demo", help="local control plane + token server + operator + examples")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to show tokens flowing")
    demo.add_argument("--token-lifetime", type=int, default=20, help="lifetime of demo tokens, seconds")

    commands.add_parser("build-control-plane", help="build (or reuse) kube-apiserver, kubectl and etcd")

    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "demo":
        from secured_endpoint.devenv import demo as demo_module

        return demo_module.main(duration=args.duration, token_lifetime=args.token_lifetime)
    from secured_endpoint.devenv import controlplane

    controlplane.ensure_binaries()
    return 0


def _run(args: argparse.Namespace) -> int:
    import kopf

    from secured_endpoint import wiring

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
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    for chatty in ("httpx", "httpcore"):  # one line per request and per socket step: noise, not news
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if not args.verbose:
        # kopf says "Handler ... succeeded" for every event of every watched Secret and ConfigMap; the
        # operator's own log says what happened to each endpoint
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    memo = kopf.Memo(operator_settings=settings, redis_settings=redis_settings, kubeconfig=args.kubeconfig,
                     clusterwide=args.all_namespaces, namespaces=tuple(args.namespace))
    kopf.run(registry=wiring.registry, clusterwide=args.all_namespaces, namespaces=args.namespace,
             standalone=True, liveness_endpoint=args.liveness, memo=memo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
