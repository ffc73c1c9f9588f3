-- Transitions of one resource are found through its rid, `resources_id` then
-- `transitions_rid`, so the index on transitions' copy of the provider's id
-- only duplicated that path. It was the one index of transitions on a random
-- key: each batch of recorded transitions dirtied about one page of it per
-- transition, written to the WAL at every commit. Without it, `bench --e2e`
-- used 8-10% less daemon CPU per delivery (docs/performance.md).
DROP INDEX IF EXISTS transitions_resource;
