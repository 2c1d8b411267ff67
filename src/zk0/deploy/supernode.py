"""``flower-supernode`` that exits when its connection to the SuperLink ends, so it can be started again.

In Flower 1.42 a SuperNode whose connection loop fails after it was accepted (the SuperLink
answered 500, e.g. its SQLite state said ``database is locked`` under load) logs the error,
deactivates itself and returns from ``flower_supernode()``, while the thread serving its local
runtime API keeps the process alive, doing nothing: the node looks up and never trains again.
This entry point runs Flower's own ``flower_supernode()`` unchanged and, if it returns, exits with
:data:`LOST` (75, EX_TEMPFAIL), which :mod:`zk0.deploy.supervise` answers by starting it again. A refused
node (unregistered key, TLS) still exits with Flower's own code and is not restarted.

Run: ``python -m zk0.deploy.supernode`` with ``flower-supernode``'s arguments.
"""

from __future__ import annotations

import logging
import os

LOST = 75


def main() -> None:
    from zk0.flower_seams import run_supernode

    run_supernode()  # returns only when the connection loop ended; a stop or a refusal exits inside it
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("zk0.deploy.supernode").error(
        "the connection to the SuperLink ended (see the error above); exiting with code %d to be started again", LOST)
    logging.shutdown()
    os._exit(LOST)  # not sys.exit: Flower's runtime API thread would keep the process alive


if __name__ == "__main__":
    main()
