"""torchrun without its traceback for a rank that already said why it failed.

`python -m megatron_r1v3.parallel.torchrun ARGS` (torchrun's own ARGS) runs `torch.distributed.run`; when a rank
exits non-zero it ends with that rank's exit code and one line, instead of torchrun's `ChildFailedError` traceback
and failure table, which would bury the rank's own message (`r1v3 sft: error: …`). The `r1v3` command re-executes
itself through this (`cli.maybe_relaunch`).
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        print(f"[r1v3] rank {rank} ended with {how} (its own output above says why)", file=sys.stderr, flush=True)
        return code if code > 0 else 128 - code if code < 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
