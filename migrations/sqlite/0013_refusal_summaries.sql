-- Refusals beyond database.refusal_rows_per_minute, counted rather than kept
-- one a row, so a flood of forged deliveries cannot fill the disk.
CREATE TABLE refusal_summaries (
    minute      TEXT    NOT NULL,   -- YYYY-MM-DDTHH:MM (UTC) of received_at
    provider    TEXT    NOT NULL,
    reason      TEXT    NOT NULL,   -- the error code answered
    source      TEXT    NOT NULL,   -- IPv4 address or IPv6 /64; '' when unknown
    http_status INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (minute, provider, reason, source)
);
