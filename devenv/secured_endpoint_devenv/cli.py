"""``sep-devenv demo | build-control-plane``: the development harness's commands (never part of the product)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sep-devenv",
                                     description="Development harness of secured-endpoint-operator.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="local control plane + token server + operator + examples")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to show tokens flowing")
    demo.add_argument("--token-lifetime", type=int, default=20, help="lifetime of demo tokens, seconds")

    commands.add_parser("build-control-plane", help="build (or reuse) kube-apiserver, kubectl and etcd")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from secured_endpoint_devenv import demo as demo_module

        return demo_module.main(duration=args.duration, token_lifetime=args.token_lifetime)
    from secured_endpoint_devenv import controlplane

    controlplane.ensure_binaries()
    return 0


if __name__ == "__main__":
    sys.exit(main())
