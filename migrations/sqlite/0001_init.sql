-- cancelwatch schema, version 1. Times are RFC 3339 UTC text with milliseconds
-- ('2026-10-30T12:00:00.000Z'), which sorts correctly as text. Booleans are 0/1.

-- Every verified delivery, committed before the provider gets its 2xx.
CREATE TABLE inbox (
    id              INTEGER PRIMARY KEY,          -- arrival order
    provider        TEXT    NOT NULL,             -- 'stripe' | 'juice'
    dedupe_key      TEXT    NOT NULL,             -- stripe: event id; juice: event ':' lower(checksum)
    event_type      TEXT    NOT NULL,
    event_id        TEXT,                         -- stripe event id (juice has none)
    resource_kind   TEXT,                         -- e.g. 'stripe.outbound_transfer', when known
    resource_id     TEXT,                         -- the resource to fetch, when known
    context         TEXT,                         -- stripe account context
    livemode        INTEGER,
    raw_body        BLOB,                         -- exact bytes received; NULL once pruned
    body_size       INTEGER NOT NULL,
    source          TEXT    NOT NULL DEFAULT 'webhook', -- 'webhook' | 'backfill'
    received_at     TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending',
        -- 'pending' | 'processing' | 'processed' | 'ignored' | 'failed' | 'dead'
        -- failed = waiting for a retry (see next_attempt_at)
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    lease_until     TEXT,                         -- while 'processing'
    last_error      TEXT,
    processed_at    TEXT,
    UNIQUE (provider, dedupe_key)
);
CREATE INDEX inbox_ready ON inbox (state, next_attempt_at, id);
CREATE INDEX inbox_resource ON inbox (resource_id, state);
CREATE INDEX inbox_received ON inbox (received_at);

-- Deliveries refused before they reached the inbox: never the body.
CREATE TABLE refusals (
    id          INTEGER PRIMARY KEY,
    provider    TEXT    NOT NULL,
    reason      TEXT    NOT NULL,                 -- the error code answered
    message     TEXT    NOT NULL,
    http_status INTEGER NOT NULL,
    body_size   INTEGER,
    remote_addr TEXT,
    received_at TEXT    NOT NULL
);
CREATE INDEX refusals_received ON refusals (received_at);

-- One row per tracked resource: its current state.
CREATE TABLE resources (
    rid                 INTEGER PRIMARY KEY,
    provider            TEXT    NOT NULL,
    kind                TEXT    NOT NULL,         -- 'stripe.outbound_transfer' | 'stripe.batch_job' | 'juice.bulk_transfer' | 'juice.transfer'
    id                  TEXT    NOT NULL,         -- the provider's id
    parent_id           TEXT,                     -- juice.transfer: its bulk transfer
    status              TEXT,                     -- current status (NULL until first fetched)
    terminal            INTEGER NOT NULL DEFAULT 0,
    livemode            INTEGER,
    context             TEXT,                     -- stripe account context to fetch with
    amount              INTEGER,                  -- minor units
    currency            TEXT,
    snapshot            TEXT,                     -- last fetched object, JSON
    provider_updated_at TEXT,                     -- provider's own time of the last state
    status_since        TEXT,                     -- when the current status was first observed
    first_seen_at       TEXT    NOT NULL,
    last_observed_at    TEXT,
    not_found           INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at TEXT,                     -- a cancel went out through cancelwatch
    next_reconcile_at   TEXT,                     -- NULL when terminal
    reconcile_failures  INTEGER NOT NULL DEFAULT 0,
    UNIQUE (provider, kind, id)
);
CREATE INDEX resources_id ON resources (id);
CREATE INDEX resources_parent ON resources (parent_id);
CREATE INDEX resources_reconcile ON resources (next_reconcile_at);

-- Every observed status change: exactly one row each, append-only.
CREATE TABLE transitions (
    id           INTEGER PRIMARY KEY,
    rid          INTEGER NOT NULL REFERENCES resources (rid),
    provider     TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    resource_id  TEXT    NOT NULL,
    parent_id    TEXT,
    from_status  TEXT,                            -- NULL on the first observation
    to_status    TEXT    NOT NULL,
    observed_at  TEXT    NOT NULL,
    provider_at  TEXT,                            -- e.g. status_transitions.canceled_at
    trigger_type TEXT    NOT NULL,                -- 'event' | 'reconcile' | 'cancel' | 'backfill' | 'replay'
    trigger_id   TEXT,                            -- event id / dedupe key, cancel request id
    livemode     INTEGER,
    snapshot     TEXT                             -- the object as fetched, JSON
);
CREATE INDEX transitions_resource ON transitions (resource_id, id);
CREATE INDEX transitions_rid ON transitions (rid, id);
CREATE INDEX transitions_observed ON transitions (observed_at, id);
CREATE INDEX transitions_to ON transitions (to_status, observed_at);
CREATE INDEX transitions_kind ON transitions (kind, observed_at);
CREATE INDEX transitions_provider ON transitions (provider, observed_at);

-- Progress counts of batch jobs (and any other counted resource) per observation.
CREATE TABLE progress (
    id              INTEGER PRIMARY KEY,
    rid             INTEGER NOT NULL REFERENCES resources (rid),
    observed_at     TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    success_count   INTEGER,
    failure_count   INTEGER,
    validated_count INTEGER,
    trigger_type    TEXT    NOT NULL,
    trigger_id      TEXT
);
CREATE INDEX progress_rid ON progress (rid, id);

-- The money side of a cancellation: one refund per transfer.
CREATE TABLE refunds (
    id           INTEGER PRIMARY KEY,
    rid          INTEGER NOT NULL UNIQUE REFERENCES resources (rid),
    provider     TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    resource_id  TEXT    NOT NULL,
    parent_id    TEXT,
    status       TEXT    NOT NULL,                -- 'pending' | 'completed' | 'failed'
    reason       TEXT    NOT NULL,                -- the status that opened it: canceled, failed, returned, cancelled
    amount       INTEGER,
    currency     TEXT,
    opened_at    TEXT    NOT NULL,
    completed_at TEXT,
    updated_at   TEXT    NOT NULL,
    trigger_type TEXT    NOT NULL,
    trigger_id   TEXT
);
CREATE INDEX refunds_status ON refunds (status, opened_at);
CREATE INDEX refunds_parent ON refunds (parent_id);

-- Cancels issued through cancelwatch, with the provider's answer.
CREATE TABLE cancel_requests (
    id              INTEGER PRIMARY KEY,
    provider        TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    resource_id     TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    requested_by    TEXT    NOT NULL,             -- 'cli' | 'api'
    requested_at    TEXT    NOT NULL,
    http_status     INTEGER,
    outcome         TEXT,                         -- 'accepted' | 'already_cancelled' | 'not_cancellable' | 'not_found' | 'partial_cancellation' | 'idempotency_conflict' | 'error'
    error_code      TEXT,
    response_body   TEXT,
    answered_at     TEXT
);
CREATE INDEX cancel_requests_resource ON cancel_requests (resource_id, id);

-- One alert per (rule, resource); later observations update it.
CREATE TABLE alerts (
    id          TEXT    PRIMARY KEY,              -- 'alrt_<uuid>'
    rule        TEXT    NOT NULL,
    severity    TEXT    NOT NULL,
    provider    TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    resource_id TEXT    NOT NULL,
    summary     TEXT    NOT NULL,
    details     TEXT    NOT NULL,                 -- JSON
    state       TEXT    NOT NULL DEFAULT 'open',  -- 'open' | 'resolved'
    version     INTEGER NOT NULL DEFAULT 1,       -- bumped on each update
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    resolved_at TEXT,
    UNIQUE (rule, provider, kind, resource_id)
);
CREATE INDEX alerts_created ON alerts (created_at);
CREATE INDEX alerts_resource ON alerts (resource_id);

-- What must reach each sink: one row per (alert version, sink).
CREATE TABLE alert_outbox (
    id              INTEGER PRIMARY KEY,
    alert_id        TEXT    NOT NULL REFERENCES alerts (id),
    alert_version   INTEGER NOT NULL,
    sink            TEXT    NOT NULL,
    payload         TEXT    NOT NULL,             -- the JSON sent
    state           TEXT    NOT NULL DEFAULT 'pending', -- 'pending' | 'delivered'
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    last_error      TEXT,
    created_at      TEXT    NOT NULL,
    delivered_at    TEXT,
    UNIQUE (alert_id, alert_version, sink)
);
CREATE INDEX alert_outbox_due ON alert_outbox (state, next_attempt_at);

CREATE TABLE alert_attempts (
    id           INTEGER PRIMARY KEY,
    outbox_id    INTEGER NOT NULL REFERENCES alert_outbox (id),
    attempted_at TEXT    NOT NULL,
    status_code  INTEGER,
    error        TEXT
);
CREATE INDEX alert_attempts_outbox ON alert_attempts (outbox_id);
