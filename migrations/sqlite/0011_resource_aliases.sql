-- Other ids a resource is known by. A Juice item is recorded under its `id`
-- when the answer carries one, else under `<bulk transfer id>:<reference>`
-- (Juice documents items without an id); an item answered in both forms
-- must stay one resource, so the key it was not recorded under is kept here
-- and looked up before a resource is added.
CREATE TABLE resource_aliases (
    alias    TEXT    NOT NULL,
    provider TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    rid      INTEGER NOT NULL REFERENCES resources (rid),
    PRIMARY KEY (alias, provider, kind)
) WITHOUT ROWID;

-- Items recorded before, under their id, are known by their reference too.
INSERT OR IGNORE INTO resource_aliases (alias, provider, kind, rid)
SELECT parent_id || ':' || json_extract(snapshot, '$.reference'), provider, kind, rid
FROM resources
WHERE kind = 'juice.transfer'
  AND parent_id IS NOT NULL
  AND json_valid(snapshot)
  AND json_type(snapshot, '$.reference') = 'text'
  AND json_extract(snapshot, '$.reference') <> ''
  AND id <> parent_id || ':' || json_extract(snapshot, '$.reference');
