"""`python -m trainer.worker.launch`: torchrun that keeps the workers' exit codes.

torchrun exits 1 whenever a worker fails and when it is itself sent SIGTERM, so
under `restartPolicy: ExitCode` a preempted pod (workers committed and exited
143) or a bad config (exit 2) would look alike to the operator. This wrapper
takes torchrun's own arguments and PET_* environment unchanged and exits with
the first failed worker's code (a signal N as 128+N), or 128+N when the agent
itself was signalled, after torchrun has stopped the workers.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        return 128 - first.exitcode if first.exitcode < 0 else first.exitcode
    except SignalException as signalled:
        return 128 + int(signalled.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
