"""The `kubetrain` command line: helm- and kubectl-shaped verbs over one values format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer import __version__
from trainer.errors import EXIT_USAGE, UserError


def add_values_arguments(parser: argparse.ArgumentParser) -> None:
    """NAME plus the value sources, spelled as in `helm template`."""
    parser.add_argument("name", metavar="NAME", help="experiment name (the Helm release name)")
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                        help="values file; repeatable, later files win")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VAL",
                        help="set values on the command line (Helm typing: ints, true/false, null)")
    parser.add_argument("--set-string", action="append", default=[], metavar="KEY=VAL",
                        help="set STRING values on the command line")
    parser.add_argument("--set-json", action="append", default=[], metavar="KEY=JSON",
                        help="set JSON values on the command line (e.g. floats, lists)")


def resolved_values(args: argparse.Namespace) -> dict:
    from trainer.values import resolve_values

    return resolve_values(args.values, args.set_values, args.set_string, args.set_json)


def cmd_run(args: argparse.Namespace) -> int:
    from trainer.config import trainer_config_from_values
    from trainer.controller.local import LocalRunner

    values = resolved_values(args)
    trainer_config_from_values(args.name, values)  # name and sections check before any process starts
    workdir = Path(args.workdir) if args.workdir else Path(".kubetrain") / "runs" / args.name
    return LocalRunner(args.name, values, workdir.resolve()).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetrain",
        description="Train PyTorch models as Kubeflow PyTorchJobs, or locally as processes.",
    )
    parser.add_argument("--version", action="version", version=f"kubetrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the job locally, one process per replica (no cluster)")
    add_values_arguments(run)
    run.add_argument("--workdir", metavar="DIR",
                     help="where the trainer config and outputs go (default .kubetrain/runs/NAME)")
    run.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
