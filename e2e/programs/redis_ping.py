"""A test workload: from inside its pod, write its pod name into Redis
at $REDIS_HOST:$REDIS_PORT (a service the cluster offers on the host), then idle."""

import os
import socket
import time

host, port = os.environ["REDIS_HOST"], int(os.environ["REDIS_PORT"])
key, value = f"e2e:{os.environ['POD_NAME']}", os.environ["POD_IP"]
while True:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            cmd = f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n${len(value)}\r\n{value}\r\n"
            sock.sendall(cmd.encode())
            if sock.recv(64).startswith(b"+OK"):
                break
    except OSError:
        pass
    time.sleep(0.5)
while True:
    time.sleep(1)
