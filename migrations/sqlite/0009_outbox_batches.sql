-- The outbox as one row per transaction instead of one per message (issue
-- 11): a stage's checkpoint that closes a window derives one message per
-- meter, and inserting, reading back and deleting those rows one by one
-- cost about as much as storing the windows themselves. A batch holds the
-- messages of one `Store::apply`, in order (postcard: topic, key, value,
-- headers each); its seq is every message's seq.
--
-- Rows an earlier build left in `outbox` are still published first (see
-- `pending_outbox` in store/sqlite.rs); nothing writes there any more.

CREATE TABLE outbox_batches (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    stage    TEXT NOT NULL,
    messages BLOB NOT NULL
);
CREATE INDEX outbox_batches_stage_seq ON outbox_batches (stage, seq);
