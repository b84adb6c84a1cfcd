"""fetch_journal: entries survive a reopen, a torn tail is dropped, a journal of another result state is ignored."""

from __future__ import annotations

from data_tools.fetch_journal import FetchJournal


def test_journal_round_trip_torn_tail_and_stale_base(tmp_path):
    result = tmp_path / "00000-000001.parquet"
    journal = FetchJournal(result)
    assert journal.load() == {}
    journal.add(3, {"reason": None, "row": {"jpeg": b"\xff\xd8\xff", "width": 7}})
    journal.add(5, {"reason": "http_404", "row": None})
    journal.close()
    assert FetchJournal(result).load() == {3: {"reason": None, "row": {"jpeg": b"\xff\xd8\xff", "width": 7}},
                                           5: {"reason": "http_404", "row": None}}
    data = journal.path.read_bytes()
    journal.path.write_bytes(data[:-5])  # the last entry torn (power loss mid-write)
    reopened = FetchJournal(result)
    assert reopened.load() == {3: {"reason": None, "row": {"jpeg": b"\xff\xd8\xff", "width": 7}}}
    reopened.add(6, {"reason": None, "row": None})  # appended after the valid prefix, the torn bytes gone
    reopened.close()
    assert sorted(FetchJournal(result).load()) == [3, 6]
    result.write_bytes(b"a finished result")  # the shard was written but the journal not yet removed
    assert FetchJournal(result).load() == {}  # stale: ignored and restarted
    FetchJournal(result).remove()
    assert not journal.path.exists()
