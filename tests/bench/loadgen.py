"""Python HTTP/1.1 load for what wrk cannot do here (there is no wrk2): runs as its own process.

    loadgen.py rate HOST PORT PATH RATE SECONDS   open-loop constant rate; prints JSON latencies
    loadgen.py idle HOST PORT PATH COUNT          COUNT keep-alive connections, one request each,
                                                  then idle; prints JSON, waits for a line on stdin,
                                                  prints how many the server closed meanwhile

The constant-rate mode measures each latency from the moment the request was due, not from when a
connection was free, so a stalled proxy shows up in p99 (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

RATE_CONNECTIONS = 16
IDLE_BATCH = 200
IDLE_TIMEOUT = 30.0


def request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: l7proxy-bench\r\n\r\n".encode()
    )


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked) and return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            fields[name.strip().lower()] = value.strip()
    if "chunked" in fields.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2) if size else await reader.readuntil(b"\r\n\r\n")
            if size == 0:
                break
    elif "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    return status


def percentiles(latencies_ms: list[float]) -> dict:
    values = sorted(latencies_ms)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}

    def at(q: float) -> float:
        return values[max(0, min(len(values) - 1, int(-(-len(values) * q // 100)) - 1))]

    return {"p50_ms": at(50), "p99_ms": at(99), "max_ms": values[-1]}


async def constant_rate(host: str, port: int, path: str, rate: float, seconds: float) -> dict:
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    raw = request(host, port, path)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (when := await due.get()) is not None:
                writer.write(raw)
                status = await read_response(reader)
                latencies.append((time.perf_counter() - when) * 1000.0)
                statuses[status] = statuses.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(RATE_CONNECTIONS)]
    total = int(rate * seconds)
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    start = time.perf_counter() + 0.05
    for i in range(total):
        when = start + i / rate
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait(when)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    return {
        "sent": total,
        "completed": len(latencies),
        "achieved_rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors[:5],
        **percentiles(latencies),
    }


async def idle_connections(host: str, port: int, path: str, count: int) -> None:
    raw = request(host, port, path)
    held: list[asyncio.StreamWriter] = []
    closed = 0
    failures: list[str] = []
    gate = asyncio.Semaphore(IDLE_BATCH)

    async def watch(reader: asyncio.StreamReader) -> None:
        nonlocal closed
        try:
            await reader.read(1)  # returns only on EOF or on bytes nobody asked for
        except OSError:
            pass
        closed += 1

    async def open_one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), IDLE_TIMEOUT
                )
                writer.write(raw)
                status = await asyncio.wait_for(read_response(reader), IDLE_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                return
            if status != 200:
                failures.append(f"status {status}")
            held.append(writer)
            asyncio.create_task(watch(reader))

    started = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(count)))
    report = {
        "open": len(held),
        "failed": len(failures),
        "first_failures": sorted(set(failures))[:3],
        "seconds": round(time.monotonic() - started, 2),
    }
    print(json.dumps(report), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"closed_meanwhile": closed}), flush=True)
    for writer in held:
        writer.close()


def main(argv: list[str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        from uvloop import run
    except ImportError:
        from asyncio import run
    mode, host, port, path = argv[0], argv[1], int(argv[2]), argv[3]
    if mode == "rate":
        result = run(constant_rate(host, port, path, float(argv[4]), float(argv[5])))
        print(json.dumps(result), flush=True)
    elif mode == "idle":
        run(idle_connections(host, port, path, int(argv[4])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
