"""One keep-alive HTTP connection, driven line by line: each path read from stdin is a GET on
the same connection; prints the status (or the error) per line. `python keepalive_client.py HOST
PORT` inside a pod."""

from __future__ import annotations

import http.client
import sys


def main() -> None:
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)
    for line in sys.stdin:
        try:
            conn.request("GET", line.strip())
            answer = conn.getresponse()
            answer.read()
            print(answer.status, flush=True)
        except OSError as exc:
            print(f"error {exc!r}", flush=True)
            return


if __name__ == "__main__":
    main()
