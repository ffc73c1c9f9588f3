-- Refusals beyond database.refusal_rows_per_minute, counted rather than kept
-- one a row, so a flood of forged deliveries cannot fill the disk (as on
-- SQLite: migrations/0013_refusal_summaries.sql).
CREATE TABLE refusal_summaries (
    minute      TEXT    NOT NULL,   -- YYYY-MM-DDTHH:MM (UTC) of received_at
    provider    TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    source      TEXT    NOT NULL,   -- IPv4 address or IPv6 /64; '' when unknown
    http_status BIGINT  NOT NULL,
    count       BIGINT  NOT NULL,
    PRIMARY KEY (minute, provider, reason, source)
);
