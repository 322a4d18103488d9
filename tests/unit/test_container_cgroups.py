"""CgroupWatcher on a plain directory tree (real inotify; cgroupfs raises the same IN_CREATE for
a runtime's mkdir): a container's cgroup found when it appears, at once when it exists, under a
parent made later, by the rescan, and never after a cancel."""

from __future__ import annotations

import asyncio
import contextlib

from l7proxy.agent.container_cgroups import CgroupWatcher, cgroup_names

CID = "a06a9f0870cdc48864a336c2aaf46eb1ba534349c032ebed3b348586e9da4323"


@contextlib.contextmanager
def _watching(root, **kw):
    """A started CgroupWatcher, closed again on the way out."""
    w = CgroupWatcher(root, **kw)
    w.start()
    try:
        yield w
    finally:
        w.close()


async def _found_within(watcher: CgroupWatcher, cid: str, make, timeout: float = 2.0):
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    watcher.wait_for(cid, lambda path: got.done() or got.set_result(path))
    make()
    return await asyncio.wait_for(got, timeout)


def test_names_cover_podman_cgroupfs_and_systemd():
    names = cgroup_names("abc")
    assert "libpod-abc" in names and "libpod-abc.scope" in names


def test_found_when_the_runtime_makes_it(tmp_path):
    parent = tmp_path / "libpod_parent"
    parent.mkdir()

    async def main():
        with _watching(tmp_path, rescan_interval=60) as w:
            loop = asyncio.get_running_loop()
            started = loop.time()
            path = await _found_within(w, CID, lambda: (parent / f"libpod-{CID}").mkdir())
            return path, loop.time() - started, dict(w.pending)

    path, took, pending = asyncio.run(main())
    assert path == parent / f"libpod-{CID}"
    assert took < 0.5 and pending == {}  # by the event, not the (60 s) rescan


def test_existing_cgroup_answers_at_once_and_other_names_do_not_match(tmp_path):
    (tmp_path / "machine.slice" / f"libpod-{CID}.scope").mkdir(parents=True)
    (tmp_path / "libpod_parent").mkdir()
    seen = []

    async def main():
        with _watching(tmp_path, rescan_interval=60) as w:
            w.wait_for(CID, seen.append)
            other = "f" * 64
            w.wait_for(other, seen.append)
            (tmp_path / "libpod_parent" / f"libpod-{other}x").mkdir()  # a longer id: no match
            (tmp_path / "libpod_parent" / "conmon").mkdir()
            await asyncio.sleep(0.2)
            return set(w.pending)

    pending = asyncio.run(main())
    assert seen == [tmp_path / "machine.slice" / f"libpod-{CID}.scope"]
    assert pending == {"f" * 64}


def test_parent_made_after_start_is_watched(tmp_path):
    async def main():
        with _watching(tmp_path, rescan_interval=60) as w:

            def make():
                (tmp_path / "libpod_parent").mkdir()
                (tmp_path / "libpod_parent" / f"libpod-{CID}").mkdir()

            return await _found_within(w, CID, make)

    assert asyncio.run(main()) == tmp_path / "libpod_parent" / f"libpod-{CID}"


def test_rescan_finds_what_no_event_announced(tmp_path):
    # A parent outside the root's watch (nested) is found by the periodic rescan alone.
    async def main():
        with _watching(tmp_path, parents=("a/b",), rescan_interval=0.05) as w:
            return await _found_within(
                w, CID, lambda: (tmp_path / "a" / "b" / f"libpod-{CID}").mkdir(parents=True)
            )

    assert asyncio.run(main()) == tmp_path / "a" / "b" / f"libpod-{CID}"


def test_cancelled_wait_is_never_called(tmp_path):
    (tmp_path / "libpod_parent").mkdir()
    seen = []

    async def main():
        with _watching(tmp_path, rescan_interval=0.05) as w:
            w.wait_for(CID, seen.append)
            w.cancel(CID)
            (tmp_path / "libpod_parent" / f"libpod-{CID}").mkdir()
            await asyncio.sleep(0.2)

    asyncio.run(main())
    assert seen == []


def test_an_empty_cgroup_left_from_the_last_run_waits_for_the_new_one(tmp_path):
    # podman restart: DEL, then ADD while the old libpod-<id> may still be there, empty.
    old = tmp_path / "libpod_parent" / f"libpod-{CID}"
    old.mkdir(parents=True)
    (old / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    seen = []

    async def main():
        with _watching(tmp_path, rescan_interval=0.05) as w:
            w.wait_for(CID, seen.append)
            await asyncio.sleep(0.2)  # rescans too: the empty one is not taken
            assert seen == [] and CID in w.pending
            (old / "cgroup.events").unlink()
            old.rmdir()
            old.mkdir()  # runc makes the new one
            for _ in range(50):
                if seen:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert seen == [old]
