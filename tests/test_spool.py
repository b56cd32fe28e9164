"""Tests for ``oaproxy.sinks.spool``: the spool file, its offset, its trouble."""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Callable
from typing import IO, Any

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.sinks.spool import Spool


class TornWriter:
    """A spool file on a disk that fills up mid-line: half of what is written
    reaches the file, then the write fails."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, data: bytes) -> int:
        # os, not open: open is what the test replaces.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, data[: len(data) // 2])
        finally:
            os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.dropped: list[str] = []
        self.complaints: list[str] = []

    def spool(self, decode: Callable[[bytes], Any] = int) -> Spool[Any]:
        spool: Spool[Any] = Spool(
            self.directory,
            "test",
            decode=decode,
            drop=self.dropped.append,
            complain=self.complaints.append,
        )
        self.addCleanup(spool.close)
        return spool

    def spill(self, spool: Spool[Any], numbers: range) -> None:
        for number in numbers:
            spool.spill(str(number).encode())

    def file_bytes(self, name: str = "test.jsonl") -> bytes:
        with open(os.path.join(self.directory, name), "rb") as f:
            return f.read()

    def test_lines_come_back_as_spilled(self) -> None:
        """A spilled line is stored with a newline after it and handed to
        ``decode`` without it; ``spill`` answers the bytes it took."""
        spool = self.spool(decode=bytes)
        self.assertEqual(spool.spill(b'{"id":"a"}'), 11)
        self.assertEqual(spool.spill(b'{"id":"b"}'), 11)
        self.assertEqual(self.file_bytes(), b'{"id":"a"}\n{"id":"b"}\n')
        batch = spool.read_batch(10)
        assert batch is not None
        self.assertEqual(batch.records, [b'{"id":"a"}', b'{"id":"b"}'])
        self.assertEqual(batch.size, 22)

    def test_replayed_in_order_then_removed(self) -> None:
        """Batches come back oldest first, at most ``limit`` records each; once
        all of it is advanced past, the file is removed and the spool is empty."""
        spool = self.spool()
        self.assertFalse(spool.has_records)
        self.spill(spool, range(5))
        self.assertTrue(spool.has_records)
        self.assertEqual(spool.unreplayed_bytes, 10)
        first = spool.read_batch(3)
        assert first is not None
        self.assertEqual(first.records, [0, 1, 2])
        self.assertFalse(spool.advance(first.size))
        self.assertEqual(spool.unreplayed_bytes, 4)
        second = spool.read_batch(3)
        assert second is not None
        self.assertEqual(second.records, [3, 4])
        self.assertTrue(spool.advance(second.size))
        self.assertFalse(spool.has_records)
        self.assertEqual(spool.unreplayed_bytes, 0)
        self.assertEqual(os.listdir(self.directory), [])

    def test_unreplayed_batch_is_read_again(self) -> None:
        """A batch not advanced past (its write failed) is what the next read
        returns again."""
        spool = self.spool()
        self.spill(spool, range(3))
        batch = spool.read_batch(2)
        again = spool.read_batch(2)
        assert batch is not None and again is not None
        self.assertEqual(again.records, batch.records)

    def test_next_run_resumes_at_saved_offset(self) -> None:
        """``close`` saves how far the replay got; a spool loaded on the same
        file afterwards replays only the rest."""
        first = self.spool()
        self.spill(first, range(10))
        batch = first.read_batch(4)
        assert batch is not None
        first.advance(batch.size)
        first.close()
        self.assertEqual(self.file_bytes("test.offset"), b"8\n")

        second = self.spool()
        second.load()
        self.assertEqual(second.unreplayed_bytes, 12)
        rest = second.read_batch(100)
        assert rest is not None
        self.assertEqual(rest.records, list(range(4, 10)))

    def test_no_offset_saved_before_any_replay(self) -> None:
        """A spool closed with nothing replayed leaves only its records."""
        spool = self.spool()
        self.spill(spool, range(3))
        spool.close()
        self.assertEqual(os.listdir(self.directory), ["test.jsonl"])

    def test_unusable_offset_replays_from_start(self) -> None:
        """An offset file that is not a number, or points past the end of the
        spool, means replaying from the start: repeats, never a loss."""
        self.spill(self.spool(), range(3))
        for saved in (b"twelve\n", b"99\n"):
            with open(os.path.join(self.directory, "test.offset"), "wb") as f:
                f.write(saved)
            spool = self.spool()
            spool.load()
            batch = spool.read_batch(10)
            assert batch is not None
            self.assertEqual(batch.records, [0, 1, 2])

    def test_load_without_a_file(self) -> None:
        """With no spool file there is nothing to replay, and nothing to say."""
        spool = self.spool()
        spool.load()
        self.assertFalse(spool.has_records)
        self.assertEqual(self.complaints, [])

    def test_undecodable_line_dropped_and_passed(self) -> None:
        """A line ``decode`` refuses is reported as a dropped record with its
        byte position, and the batch's size still covers it."""
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "test.jsonl"), "wb") as f:
            f.write(b"1\ntorn\n3\n")
        spool = self.spool()
        spool.load()
        batch = spool.read_batch(10)
        assert batch is not None
        self.assertEqual(batch.records, [1, 3])
        self.assertEqual(batch.size, 9)
        self.assertEqual(
            self.dropped,
            [f"undecodable line in {os.path.join(self.directory, 'test.jsonl')} at byte 2"],
        )
        self.assertTrue(spool.advance(batch.size))

    def test_one_read_stops_after_about_4_mib(self) -> None:
        """However high ``limit`` is, one read stops at the line that crosses
        4 MiB, so a spool of huge records is never read whole."""
        spool = self.spool(decode=len)
        big = b"x" * (2 * 1024 * 1024)
        for _ in range(3):
            spool.spill(big)
        first = spool.read_batch(100)
        assert first is not None
        self.assertEqual(first.records, [len(big), len(big)])
        spool.advance(first.size)
        rest = spool.read_batch(100)
        assert rest is not None
        self.assertEqual(rest.records, [len(big)])

    def test_file_cut_by_someone_else(self) -> None:
        """A file shorter than what was spilled into it yields an empty batch
        covering the rest, so the replay moves on instead of spinning."""
        spool = self.spool()
        self.spill(spool, range(2))
        os.truncate(os.path.join(self.directory, "test.jsonl"), 0)
        batch = spool.read_batch(10)
        assert batch is not None
        self.assertEqual(batch.records, [])
        self.assertTrue(spool.advance(batch.size))
        self.assertFalse(spool.has_records)

    def test_vanished_file_counts_its_records_lost(self) -> None:
        """A spool file removed behind the spool's back cannot be read: that is
        reported as a loss, and the spool is empty (appends start afresh)."""
        spool = self.spool()
        self.spill(spool, range(2))
        os.remove(os.path.join(self.directory, "test.jsonl"))
        self.assertIsNone(spool.read_batch(10))
        self.assertEqual(len(self.dropped), 1)
        self.assertIn("vanished", self.dropped[0])
        self.assertFalse(spool.has_records)

    def test_unreadable_file_is_kept_for_a_later_try(self) -> None:
        """A spool that cannot be read for now is reported, not given up: once
        it can be read again it replays from where it was."""
        spool = self.spool()
        self.spill(spool, range(2))
        spool.close()
        path = os.path.join(self.directory, "test.jsonl")
        os.rename(path, path + ".aside")
        os.mkdir(path)
        self.assertIsNone(spool.read_batch(10))
        self.assertIn("cannot read spool", self.complaints[0])
        self.assertEqual(self.dropped, [])
        self.assertTrue(spool.has_records)
        os.rmdir(path)
        os.rename(path + ".aside", path)
        batch = spool.read_batch(10)
        assert batch is not None
        self.assertEqual(batch.records, [0, 1])

    def test_torn_append_is_cut_back(self) -> None:
        """An append that fails halfway raises, and the half line it left is cut
        off, so the next record starts on a line of its own and nothing that was
        whole before is lost."""
        self.spill(self.spool(), range(1, 2))
        spool = self.spool()
        spool.load()
        path = os.path.join(self.directory, "test.jsonl")
        real_open = builtins.open

        def open_torn(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
            if file == path and mode == "ab":
                return TornWriter(path)  # type: ignore[return-value]
            return real_open(file, mode, *args, **kwargs)

        patched = self.patch(builtins, "open", open_torn)
        self.assertRaises(OSError, spool.spill, b"22222222")
        patched.restore()
        self.assertEqual(self.file_bytes(), b"1\n")
        spool.spill(b"3")
        batch = spool.read_batch(10)
        assert batch is not None
        self.assertEqual(batch.records, [1, 3])
        self.assertEqual(self.dropped, [])

    def test_closed_spool_holds_no_file_open(self) -> None:
        """After ``close`` a spill still reaches the file but does not keep it
        open: the next spill goes to whatever file is at the path by then."""
        spool = self.spool()
        spool.close()
        spool.spill(b"1")
        path = os.path.join(self.directory, "test.jsonl")
        os.rename(path, path + ".taken")
        spool.spill(b"2")
        self.assertEqual(self.file_bytes(), b"2\n")
        self.assertEqual(self.file_bytes("test.jsonl.taken"), b"1\n")
