"""The `kubetrain` command line: helm- and kubectl-shaped verbs over one values format."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer import __version__
from trainer.errors import EXIT_STORAGE_UNAVAILABLE, EXIT_USAGE, UserError


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


def checked_values(args: argparse.Namespace) -> dict:
    """The values, merged and validated, then the chart's own checks: what run, render and submit refuse."""
    from trainer.controller.checks import check_values

    values = resolved_values(args)
    check_values(args.name, values)
    return values


def value_flags(args: argparse.Namespace):
    """The value flags as given, for helm: it merges them as trainer/values.py does."""
    from trainer.controller.helm import ValueFlags

    return ValueFlags(tuple(args.values), tuple(args.set_values), tuple(args.set_string), tuple(args.set_json))


def cmd_run(args: argparse.Namespace) -> int:
    from trainer.config import trainer_config_from_values
    from trainer.controller.checks import container_env
    from trainer.controller.local import LocalRunner, unreachable_endpoint
    from trainer.hub import require_reachable_models
    from trainer.values import resolve_python_path

    values = checked_values(args)  # what render and submit refuse, run refuses
    values = resolve_python_path(values, args.values, args.set_values + args.set_string + args.set_json)
    config = trainer_config_from_values(args.name, values)  # the sections check before any process starts
    require_reachable_models(config.training, {**os.environ, **container_env(values)})  # the replicas' env
    unreachable = unreachable_endpoint(values)  # in seconds, before anything starts or is written
    if unreachable:
        print(f"Error: {unreachable}", file=sys.stderr)
        return EXIT_STORAGE_UNAVAILABLE
    return LocalRunner(args.name, values, run_workdir(args)).run()


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from trainer.config import check_experiment_name
    from trainer.controller.tensorboard import serve

    check_experiment_name(args.name)
    values = resolved_values(args)
    return serve(args.name, values, run_workdir(args), Path(".kubetrain") / "tensorboard", args.host, args.port)


def run_workdir(args: argparse.Namespace) -> Path:
    from trainer.controller.local import default_workdir

    return Path(args.workdir).resolve() if args.workdir else default_workdir(args.name)


def cmd_render(args: argparse.Namespace) -> int:
    from trainer.controller import helm

    checked_values(args)  # a bad value is one message naming its key, before helm runs
    sys.stdout.write(helm.template(args.name, value_flags(args), include_tests=not args.skip_tests))
    return 0


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the cluster is, spelled as in kubectl."""
    parser.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context to use")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")


def connect(args: argparse.Namespace):
    from trainer.controller.kube import Kube

    return Kube.connect(args.kubeconfig, args.context, args.namespace)


def cmd_submit(args: argparse.Namespace) -> int:
    from trainer.controller import helm, jobs

    values = checked_values(args)  # every values/name check before helm or the cluster
    helm.binary("submit")
    return jobs.submit(connect(args), args.name, value_flags(args), (args.kubeconfig, args.context),
                       dry_run=args.dry_run, force=args.force, wait=args.wait, values=values)


def cmd_status(args: argparse.Namespace) -> int:
    from trainer.controller import jobs

    return jobs.status(connect(args), args.name, follow=args.watch)


def cmd_logs(args: argparse.Namespace) -> int:
    from trainer.controller import jobs

    return jobs.logs(connect(args), args.name, follow=args.follow, rank=args.rank, wait_seconds=args.wait_seconds,
                     previous=args.previous)


def cmd_list(args: argparse.Namespace) -> int:
    from trainer.controller import jobs

    return jobs.list_experiments(connect(args), all_namespaces=args.all_namespaces)


def cmd_delete(args: argparse.Namespace) -> int:
    from trainer.controller import jobs

    return jobs.delete(connect(args), args.name)


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

    board = sub.add_parser("tensorboard", help="serve the experiment's TensorBoard events: the local run's, "
                                               "else those under checkpoint.uri")
    add_values_arguments(board)
    board.add_argument("--workdir", metavar="DIR", help="the local run's directory (default .kubetrain/runs/NAME)")
    board.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    board.add_argument("--port", type=int, default=6006, help="port to serve on (default 6006; 0 picks a free one)")
    board.set_defaults(handler=cmd_tensorboard)

    render = sub.add_parser("render", help="print the manifests: `helm template NAME` of the chart (needs helm)")
    add_values_arguments(render)
    render.add_argument("--skip-tests", action="store_true", help="leave out the `helm test` pod, as helm does")
    render.set_defaults(handler=cmd_render)

    submit = sub.add_parser("submit", help="install or upgrade the experiment's Helm release (needs helm)")
    add_values_arguments(submit)
    add_cluster_arguments(submit)
    submit.add_argument("--dry-run", action="store_true",
                        help="server-side dry run of helm template's objects: validated, nothing stored")
    submit.add_argument("--wait", action="store_true", help="follow the job until it succeeds or fails")
    submit.add_argument("--force", action="store_true",
                        help="replace an existing experiment of the same name that has different values")
    submit.set_defaults(handler=cmd_submit)

    status = sub.add_parser("status", help="conditions, replicas and pods; exit 0 succeeded, 1 failed, "
                                           "3 not finished")
    status.add_argument("name", metavar="NAME")
    add_cluster_arguments(status)
    status.add_argument("-w", "--watch", action="store_true", help="follow until the job finishes")
    status.set_defaults(handler=cmd_status)

    logs = sub.add_parser("logs", help="every replica's log, prefixed [master-0] / [worker-1]")
    logs.add_argument("name", metavar="NAME")
    add_cluster_arguments(logs)
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming, across restarts")
    logs.add_argument("--rank", type=int, help="only the pod that holds this global rank")
    logs.add_argument("-p", "--previous", action="store_true",
                      help="the log of each replica's previous container, before the kubelet restarted it")
    logs.add_argument("--wait-seconds", type=float, default=300,
                      help="how long to wait for pending pods (and, with --follow, for the job itself)")
    logs.set_defaults(handler=cmd_logs)

    listing = sub.add_parser("list", help="the experiments in the namespace")
    add_cluster_arguments(listing)
    listing.add_argument("-A", "--all-namespaces", action="store_true")
    listing.set_defaults(handler=cmd_list)

    delete = sub.add_parser("delete", help="remove the experiment's objects and Helm release, nothing else")
    delete.add_argument("name", metavar="NAME")
    add_cluster_arguments(delete)
    delete.set_defaults(handler=cmd_delete)
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
