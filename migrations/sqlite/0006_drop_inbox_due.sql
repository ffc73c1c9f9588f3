-- Claims now walk `inbox_ready` (state, next_attempt_at, id) once per state,
-- merged in order, which stops at the limit; the partial index `inbox_due`
-- went unused by the planner, and every state change of a delivery paid for
-- keeping it up to date.
DROP INDEX IF EXISTS inbox_due;
