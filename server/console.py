"""`certkv COMMAND [ARGS]`: the installed command. Each command hands its arguments to the `python -m` entry point it
names, which keeps working on its own."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version


def _serve(argv: list[str]):
    from server.cli import main
    return main(argv, prog="certkv serve")


def _generate(argv: list[str]):
    from server.client import main
    return main(argv, prog="certkv generate")


def _evaluate(argv: list[str]):
    from engine.evaluate import main
    return main(argv, prog="certkv evaluate")


def _calibrate(argv: list[str]):
    from engine.calibrate import main
    return main(argv, prog="certkv calibrate")


def _model(argv: list[str]):
    from engine.weights import main
    return main(argv, prog="certkv model")


COMMANDS = {
    "serve": (_serve, "python -m server", "run the gRPC server"),
    "generate": (_generate, "python -m server.client", "stream a generation from a server (also --info, --health)"),
    "evaluate": (_evaluate, "python -m engine.evaluate", "perplexity, KL and escalations of a KV mode on a text"),
    "calibrate": (_calibrate, "python -m engine.calibrate", "learn HeadQ's query basis from a text"),
    "model": (_model, "python -m engine.weights", "`model install`: the default model; `model convert`: a GGUF file"),
}


def usage() -> str:
    lines = [f"  {name:<10} {summary} ({module})" for name, (_, module, summary) in COMMANDS.items()]
    return "\n".join(["usage: certkv COMMAND [ARGS]   (certkv COMMAND --help for its flags)", "", "commands:", *lines])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(_version())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"certkv: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    run, _, _ = COMMANDS[argv[0]]
    return run(argv[1:]) or 0


def _version() -> str:
    try:
        return f"certkv {version('certkv')}"
    except PackageNotFoundError:
        return "certkv (not installed)"


if __name__ == "__main__":
    sys.exit(main())
