-- Fencing for checkpoints shared by several processes: whoever takes over a
-- consumer group's partition claims its checkpoint (epoch + 1); a checkpoint
-- written with an older epoch (a process that lost the partition) is refused.
ALTER TABLE stream_checkpoints ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
