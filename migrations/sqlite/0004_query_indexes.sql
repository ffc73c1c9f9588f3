-- cancelwatch schema, version 4: indexes for the audit listings.
-- Listings are keyset pages newest first (ORDER BY id DESC, id < cursor).
-- An index on (column) holds the rowid after the column, so an equality
-- filter on that column reads rows already in id order: no sort of every
-- matching row, and a deep cursor page starts right at the cursor.
CREATE INDEX transitions_kind_id ON transitions (kind, id);
CREATE INDEX transitions_to_id ON transitions (to_status, id);
CREATE INDEX transitions_provider_id ON transitions (provider, id);
CREATE INDEX inbox_state_id ON inbox (state, id);
