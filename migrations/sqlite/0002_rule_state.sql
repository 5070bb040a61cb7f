-- State the host keeps on behalf of rule plugins between calls (e.g. the
-- overload rule's consecutive overloaded windows per region), so that a
-- restart or a plugin swap does not lose an incident in progress.
CREATE TABLE IF NOT EXISTS rule_state (
    rule        TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    value       INTEGER NOT NULL,
    updated_at  TEXT    NOT NULL,
    PRIMARY KEY (rule, key)
);
