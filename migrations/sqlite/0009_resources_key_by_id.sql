-- A resource's key leads with the provider's id: UNIQUE (id, provider, kind)
-- instead of (provider, kind, id). The one index then serves both lookups by
-- the whole key (recording, upserts) and by the provider's id alone (`show`,
-- the transitions of one resource), so `resources_id` goes.
--
-- Providers' ids are random, so each new resource dirtied a page of each of
-- the two indexes on them, written to the WAL at every commit and copied again
-- at every checkpoint. With one, `bench --e2e` recorded 8-17% more a second
-- at 7-11% less daemon CPU a delivery (docs/performance.md).
--
-- SQLite cannot change a table's constraint in place: the table is built
-- again and its rows copied with their rids, which the other tables refer to
-- (transitions, progress, refunds). This runs with foreign keys off (see
-- `store::Db::open`), as SQLite's own recipe for rebuilding a table says;
-- nothing changes a rid, so every reference still holds.
CREATE TABLE resources_new (
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
    UNIQUE (id, provider, kind)
);
INSERT INTO resources_new (
    rid, provider, kind, id, parent_id, status, terminal, livemode, context,
    amount, currency, snapshot, provider_updated_at, status_since, first_seen_at,
    last_observed_at, not_found, cancel_requested_at, next_reconcile_at,
    reconcile_failures
)
SELECT
    rid, provider, kind, id, parent_id, status, terminal, livemode, context,
    amount, currency, snapshot, provider_updated_at, status_since, first_seen_at,
    last_observed_at, not_found, cancel_requested_at, next_reconcile_at,
    reconcile_failures
FROM resources;
DROP TABLE resources;
ALTER TABLE resources_new RENAME TO resources;
CREATE INDEX resources_parent ON resources (parent_id);
CREATE INDEX resources_reconcile ON resources (next_reconcile_at);
