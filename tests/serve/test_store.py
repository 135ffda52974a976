"""SQLite store: transactions, idempotent answers, stable item ids, clear errors on a wrong file."""

from __future__ import annotations

import sqlite3

import pytest

from melanogan.errors import MelanoganError
from melanogan.serve.store import ReviewStore


def test_items_keep_their_ids_and_answers_count_once(tmp_path):
    store = ReviewStore(tmp_path / "r.sqlite")
    rows = [("real", "a:1", 1, "melanoma"), ("synthetic", "s:1", 1, "synthetic-melanoma")]
    assert store.register_items("turing", "/data", rows) == 2
    ids = {i["uid"]: i["item_id"] for i in store.items("turing")}
    again = ReviewStore(tmp_path / "r.sqlite")  # a restart
    assert again.register_items("turing", "/data", rows) == 0
    assert {i["uid"]: i["item_id"] for i in again.items("turing")} == ids
    assert again.add_turing_answer("Ann", ids["s:1"], "synthetic", 4)
    assert not again.add_turing_answer("Ann", ids["s:1"], "real", 1)  # the first answer counts
    (answer,) = again.turing_answers()
    assert (answer["truth"], answer["answer"], answer["correct"], answer["confidence"]) == ("synthetic", "synthetic",
                                                                                            1, 4)
    assert again.answered_item_ids("turing", "Ann") == {ids["s:1"]}


def test_failed_transaction_leaves_nothing(tmp_path):
    store = ReviewStore(tmp_path / "r.sqlite")
    store.register_items("turing", "/d", [("real", "a", 0, "nevus")])
    item_id = store.items("turing")[0]["item_id"]
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("INSERT INTO turing_answers (reviewer, item_id, answer, confidence, answered_at) "
                   "VALUES ('Bob', ?, 'real', 3, 'now')", (item_id,))
        raise RuntimeError("crash in the middle of a write")
    assert store.turing_answers() == []
    with pytest.raises(sqlite3.IntegrityError):  # constraints hold: unknown item, bad confidence
        store.add_turing_answer("Bob", "no-such-item", "real", 3)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_turing_answer("Bob", item_id, "real", 9)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.sqlite"
    bad.write_text("these are my notes, not a database " * 100)
    with pytest.raises(MelanoganError, match="not a melanogan review database"):
        ReviewStore(bad)
    with pytest.raises(MelanoganError, match="not a file"):
        ReviewStore(tmp_path)
