"""A test workload that allocates memory until something stops it.

`memhog.py MIB_PER_STEP`: touch MIB_PER_STEP MiB every 50 ms, forever.
"""

import sys
import time

step = int(sys.argv[1]) * 1024 * 1024
held = []
while True:
    held.append(bytearray(b"x" * step))
    time.sleep(0.05)
