"""cnclip.counts.parse_count and the untrusted-text numbers read through it (headers, temporary names)."""

from __future__ import annotations

import os

import pytest

from cnclip.atomic import writer_alive
from cnclip.counts import COUNT_CAP, parse_count
from data_tools.download import parse_retry_after


@pytest.mark.parametrize("text, value", [("0", 0), ("7", 7), ("0003", 3), ("123456789012345", 123456789012345),
                                         ("9" * 16, COUNT_CAP), ("9" * 5000, COUNT_CAP)])
def test_ascii_digits_are_counted(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "²", "٣", "１", "1²", " 1", "1 ", "-5", "+5", "0x10", "1e3", "1.0", "١٠"])
def test_anything_but_ascii_digits_is_no_count(text):
    assert parse_count(text) is None


@pytest.mark.parametrize("header", ["²", "٣", "１", "9" * 5000])
def test_retry_after_reads_only_ascii_delta_seconds(header):
    # '²' used to reach float() (ValueError), '٣' was read as 3 s, 5,000 digits became an endless wait.
    value = parse_retry_after(header)
    assert value is None or value == COUNT_CAP
    assert parse_retry_after(" 30 ") == 30.0


def test_a_temporary_named_with_a_non_ascii_pid_is_nobodys(tmp_path):
    ours = tmp_path / f".x.tmp-{os.getpid()}"
    assert writer_alive(tmp_path / f".x.tmp-{os.getppid()}")  # our parent is alive: its temporary is kept
    assert not writer_alive(ours)  # our own leftover
    for name in (".x.tmp-²", ".x.tmp-٣", ".x.tmp-" + "9" * 5000, ".x.tmp-0", ".x.tmp-4294967296"):
        assert not writer_alive(tmp_path / name)
