"""``python -m bench <command>``: chaos, throughput, enqueue, reconciler, mutation, store."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    commands = ("chaos", "throughput", "enqueue", "reconciler", "mutation", "store")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m bench {{{','.join(commands)}}} [--help]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "chaos":
        from bench import chaos

        return chaos.main(rest)
    from importlib import import_module

    module = import_module(f"bench.{command}")
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
