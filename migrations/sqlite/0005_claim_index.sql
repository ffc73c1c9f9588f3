-- Claims walk the deliveries that are due in (next_attempt_at, id) order
-- through this partial index, so a claim costs the same whether the inbox
-- holds a hundred rows or ten million (the unindexed OR in the first claim
-- query scanned every row; found with a profiler under `cancelwatch bench`).
CREATE INDEX inbox_due ON inbox (next_attempt_at, id) WHERE state IN ('pending', 'failed');
