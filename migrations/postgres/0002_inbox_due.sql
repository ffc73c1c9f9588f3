-- The deliveries a claim may take, in the order it takes them: the claim
-- walks this index and stops at its limit, rather than reading and sorting
-- every delivery that is due (with a backlog, tens of thousands of rows on
-- each claim, all under the lease lock).
CREATE INDEX inbox_due ON inbox (next_attempt_at, id) WHERE state IN ('pending', 'failed');
