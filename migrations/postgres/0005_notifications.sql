-- The notification stage's delivery log: one row per webhook and event
-- (alert or tariff change). A delivered row is never sent again, so a
-- replay of alerts_processed / tariff_updates after a restart, or an
-- outbox published twice, reaches each receiver once.
CREATE TABLE notification_deliveries (
    webhook         TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    event_type      TEXT NOT NULL CHECK (event_type IN ('alert', 'tariff')),
    status          TEXT NOT NULL CHECK (status IN ('delivered', 'failing')),
    attempts        INTEGER NOT NULL,
    response_status INTEGER,
    last_error      TEXT,
    updated_at      TIMESTAMPTZ NOT NULL,
    delivered_at    TIMESTAMPTZ,
    PRIMARY KEY (webhook, event_id)
);

-- Billing (segs bill): an invoice is per meter and period (its id is
-- derived from both), so it names its meter.
ALTER TABLE invoices ADD COLUMN meter_id TEXT;
CREATE INDEX invoices_meter_period ON invoices (meter_id, billing_period_start);
