-- The whole schema of the PostgreSQL engine, equal in meaning to what the
-- SQLite migrations produce (docs/schema.md describes both). Times are the
-- same RFC 3339 UTC text with milliseconds as on SQLite, so both engines
-- store, compare and print them alike; flags are booleans, integers 64-bit.

CREATE TABLE inbox (
    id              BIGSERIAL PRIMARY KEY,          -- arrival order
    provider        TEXT    NOT NULL,
    dedupe_key      TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    event_id        TEXT,
    resource_kind   TEXT,
    resource_id     TEXT,
    context         TEXT,
    livemode        BOOLEAN,
    raw_body        BYTEA,                          -- NULL once pruned
    body_size       BIGINT  NOT NULL,
    source          TEXT    NOT NULL DEFAULT 'webhook',
    received_at     TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending',
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    -- While 'processing': the lease. `lease_until` is the holder's own
    -- token (the end it was given, which it presents to finish);
    -- `lease_expires_at` is the end by the database's clock, the only clock
    -- every replica shares; `lease_owner` is the replica holding it.
    lease_until      TEXT,
    lease_expires_at TIMESTAMPTZ,
    lease_owner      UUID,
    last_error      TEXT,
    processed_at    TEXT,
    UNIQUE (provider, dedupe_key)
);
CREATE INDEX inbox_ready ON inbox (state, next_attempt_at, id);
CREATE INDEX inbox_state_id ON inbox (state, id);
CREATE INDEX inbox_received ON inbox (received_at);
-- The backstop of "one delivery of a resource processed at a time": the
-- claim's lock already keeps two leases of one resource apart, and this
-- index refuses a second one should that rule ever be broken.
CREATE UNIQUE INDEX inbox_one_lease_per_resource ON inbox (resource_id) WHERE state = 'processing';

CREATE TABLE refusals (
    id          BIGSERIAL PRIMARY KEY,
    provider    TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    http_status BIGINT  NOT NULL,
    body_size   BIGINT,
    remote_addr TEXT,
    received_at TEXT    NOT NULL
);
CREATE INDEX refusals_received ON refusals (received_at);

CREATE TABLE resources (
    rid                 BIGSERIAL PRIMARY KEY,
    provider            TEXT    NOT NULL,
    kind                TEXT    NOT NULL,
    id                  TEXT    NOT NULL,
    parent_id           TEXT,
    status              TEXT,
    terminal            BOOLEAN NOT NULL DEFAULT false,
    livemode            BOOLEAN,
    context             TEXT,
    amount              BIGINT,
    currency            TEXT,
    snapshot            TEXT,
    provider_updated_at TEXT,
    status_since        TEXT,
    first_seen_at       TEXT    NOT NULL,
    last_observed_at    TEXT,
    not_found           BOOLEAN NOT NULL DEFAULT false,
    cancel_requested_at TEXT,
    next_reconcile_at   TEXT,
    reconcile_failures  BIGINT  NOT NULL DEFAULT 0,
    UNIQUE (id, provider, kind)
);
CREATE INDEX resources_parent ON resources (parent_id);
CREATE INDEX resources_reconcile ON resources (next_reconcile_at);

CREATE TABLE resource_aliases (
    alias    TEXT   NOT NULL,
    provider TEXT   NOT NULL,
    kind     TEXT   NOT NULL,
    rid      BIGINT NOT NULL REFERENCES resources (rid),
    PRIMARY KEY (alias, provider, kind)
);

CREATE TABLE transitions (
    id           BIGSERIAL PRIMARY KEY,
    rid          BIGINT  NOT NULL REFERENCES resources (rid),
    provider     TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    resource_id  TEXT    NOT NULL,
    parent_id    TEXT,
    from_status  TEXT,
    to_status    TEXT    NOT NULL,
    observed_at  TEXT    NOT NULL,
    provider_at  TEXT,
    trigger_type TEXT    NOT NULL,
    trigger_id   TEXT,
    livemode     BOOLEAN,
    snapshot     TEXT
);
CREATE INDEX transitions_rid ON transitions (rid, id);
CREATE INDEX transitions_observed ON transitions (observed_at, id);
CREATE INDEX transitions_kind_id ON transitions (kind, id);
CREATE INDEX transitions_to_id ON transitions (to_status, id);
CREATE INDEX transitions_provider_id ON transitions (provider, id);

CREATE TABLE progress (
    id              BIGSERIAL PRIMARY KEY,
    rid             BIGINT  NOT NULL REFERENCES resources (rid),
    observed_at     TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    success_count   BIGINT,
    failure_count   BIGINT,
    validated_count BIGINT,
    trigger_type    TEXT    NOT NULL,
    trigger_id      TEXT
);
CREATE INDEX progress_rid ON progress (rid, id);

CREATE TABLE refunds (
    id                   BIGSERIAL PRIMARY KEY,
    rid                  BIGINT  NOT NULL UNIQUE REFERENCES resources (rid),
    provider             TEXT    NOT NULL,
    kind                 TEXT    NOT NULL,
    resource_id          TEXT    NOT NULL,
    parent_id            TEXT,
    status               TEXT    NOT NULL,
    reason               TEXT    NOT NULL,
    amount               BIGINT,
    currency             TEXT,
    opened_at            TEXT    NOT NULL,
    completed_at         TEXT,
    updated_at           TEXT    NOT NULL,
    trigger_type         TEXT    NOT NULL,
    trigger_id           TEXT,
    presentment_amount   BIGINT,
    presentment_currency TEXT
);
CREATE INDEX refunds_status ON refunds (status, opened_at);
CREATE INDEX refunds_parent ON refunds (parent_id);
CREATE INDEX refunds_resource ON refunds (resource_id);

CREATE TABLE cancel_requests (
    id              BIGSERIAL PRIMARY KEY,
    provider        TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    resource_id     TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    requested_by    TEXT    NOT NULL,
    requested_at    TEXT    NOT NULL,
    http_status     BIGINT,
    outcome         TEXT,
    error_code      TEXT,
    response_body   TEXT,
    answered_at     TEXT
);
CREATE INDEX cancel_requests_resource ON cancel_requests (resource_id, id);

CREATE TABLE alerts (
    id          TEXT    PRIMARY KEY,
    rule        TEXT    NOT NULL,
    severity    TEXT    NOT NULL,
    provider    TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    resource_id TEXT    NOT NULL,
    summary     TEXT    NOT NULL,
    details     TEXT    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'open',
    version     BIGINT  NOT NULL DEFAULT 1,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    resolved_at TEXT,
    UNIQUE (rule, provider, kind, resource_id)
);
CREATE INDEX alerts_created ON alerts (created_at);
CREATE INDEX alerts_resource ON alerts (resource_id);

CREATE TABLE alert_outbox (
    id              BIGSERIAL PRIMARY KEY,
    alert_id        TEXT    NOT NULL REFERENCES alerts (id),
    alert_version   BIGINT  NOT NULL,
    sink            TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending',
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    last_error      TEXT,
    created_at      TEXT    NOT NULL,
    delivered_at    TEXT,
    UNIQUE (alert_id, alert_version, sink)
);
CREATE INDEX alert_outbox_due ON alert_outbox (state, next_attempt_at);
CREATE INDEX alert_outbox_sink_due ON alert_outbox (sink, state, next_attempt_at);

CREATE TABLE alert_attempts (
    id           BIGSERIAL PRIMARY KEY,
    outbox_id    BIGINT  NOT NULL REFERENCES alert_outbox (id),
    attempted_at TEXT    NOT NULL,
    status_code  BIGINT,
    error        TEXT
);
CREATE INDEX alert_attempts_outbox ON alert_attempts (outbox_id);

-- The replicas running against this database: each registers the backend
-- of a connection it keeps open for as long as it lives, so the others can
-- tell from pg_stat_activity that it is gone (its leases are taken up at
-- once rather than when they run out).
CREATE TABLE replicas (
    owner         UUID        PRIMARY KEY,
    backend_pid   INTEGER     NOT NULL,
    backend_start TIMESTAMPTZ NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    host          TEXT
);
