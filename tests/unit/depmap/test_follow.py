import asyncio
import json

from l7proxy.depmap.follow import follow

from .flows import DEATHSTAR, TIEFIGHTER, http_flow


def test_follow_reads_appended_lines_waits_for_partial_ones_and_rereads_after_truncation(tmp_path):
    path = tmp_path / "flows.jsonl"
    seen = []

    async def until(count):
        for _ in range(200):
            if len(seen) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"saw {len(seen)} flows, wanted {count}")

    async def scenario():
        task = asyncio.create_task(follow(str(path), seen.append, poll=0.01))
        await asyncio.sleep(0.03)  # the file does not exist yet: no error
        line = json.dumps(http_flow(TIEFIGHTER, DEATHSTAR, url="/a"))
        path.write_text(line + "\nnot json\n" + line[:20])
        await until(1)
        await asyncio.sleep(0.05)
        assert len(seen) == 1  # the partial line waits for its newline
        with path.open("a") as fh:
            fh.write(line[20:] + "\n")
        await until(2)
        path.write_text(json.dumps({"flow": http_flow(url="/b")}) + "\n")  # truncated, rewritten
        await until(3)
        task.cancel()
        assert [f["l7"]["http"]["url"] for f in seen] == ["/a", "/a", "/b"]

    asyncio.run(scenario())
