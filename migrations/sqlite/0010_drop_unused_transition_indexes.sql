-- The listings page newest first (`ORDER BY id DESC`), and for an equality
-- filter on `to_status`, `kind` or `provider` SQLite's planner takes the
-- `(column, id)` index of migration 4, which walks the rows already in that
-- order, with or without `--since`/`--until`. The `(column, observed_at)`
-- indexes below were not chosen for any listing (`EXPLAIN QUERY PLAN` at
-- 1,000,000 transitions, `examples/query_bench.rs`), yet every recorded
-- transition wrote an entry in each: 9 b-trees a transition, now 6.
-- `transitions_observed` stays for `--since`/`--until` alone.
DROP INDEX IF EXISTS transitions_to;
DROP INDEX IF EXISTS transitions_kind;
DROP INDEX IF EXISTS transitions_provider;
