"""A test workload for graceful termination.

`term.py handle MARKER`: on SIGTERM, write "clean-exit" to MARKER and exit 0.
`term.py ignore MARKER`: write "ignored" to MARKER on each SIGTERM and keep running.
Writes "started <pid>" to MARKER first.
"""

import signal
import sys
import time
from pathlib import Path

mode, marker = sys.argv[1], Path(sys.argv[2])


def on_term(signum: int, frame: object) -> None:
    if mode == "handle":
        with marker.open("a") as f:
            f.write("clean-exit\n")
        sys.exit(0)
    with marker.open("a") as f:
        f.write("ignored\n")


signal.signal(signal.SIGTERM, on_term)
marker.write_text(f"started {__import__('os').getpid()}\n")
while True:
    time.sleep(0.2)
