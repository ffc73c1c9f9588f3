//! Other ids a resource is known by (`resource_aliases`): a Juice item is
//! recorded under the key of the first answer that showed it (its id, else
//! `<bulk transfer id>:<reference>`), and the other key is kept here, so
//! that an answer in either form finds the same resource.

use crate::store::StoreError;
use rusqlite::OptionalExtension;

use super::{resource_of_row, Resource, RESOURCE_COLUMNS_NO_SNAPSHOT};
use crate::providers::{knowledge, Observation};
use crate::store::sqlite::{direct_error, Tx};

/// What [`super::find_many`] answers: each resource as stored, and whether it is new.
type Found = Vec<(Resource, bool)>;

/// Resources [`super::find_many`] found new that are stored under another
/// key of theirs ([`knowledge::other_keys`], or as an alias) are replaced by
/// the stored row. Returns, beside, the keys to remember for each (those it
/// is not stored under), in the order of `observed`; call [`add`] with them
/// once the new rows are written.
pub fn resolve(
    conn: &rusqlite::Connection,
    observed: &[&Observation],
    found: Found,
) -> Result<(Found, Vec<Vec<String>>), StoreError> {
    let mut resolved = Vec::with_capacity(found.len());
    let mut to_remember = Vec::with_capacity(found.len());
    for (obs, (current, new)) in observed.iter().zip(found) {
        if !new {
            resolved.push((current, new));
            to_remember.push(Vec::new());
            continue;
        }
        let others = knowledge::other_keys(obs);
        let stored = stored_under(conn, obs, &others)?;
        let keys: Vec<String> = std::iter::once(obs.id.clone()).chain(others).collect();
        match stored {
            Some(stored) => {
                to_remember.push(keys.into_iter().filter(|k| *k != stored.id).collect());
                resolved.push((stored, false));
            }
            None => {
                to_remember.push(keys.into_iter().filter(|k| *k != current.id).collect());
                resolved.push((current, true));
            }
        }
    }
    Ok((resolved, to_remember))
}

/// The resource stored under another key of `obs`: known by its id as an
/// alias, or stored under (or known as) one of `others`.
fn stored_under(
    conn: &rusqlite::Connection,
    obs: &Observation,
    others: &[String],
) -> Result<Option<Resource>, StoreError> {
    let mut by_id = conn
        .prepare_cached(&format!(
            "SELECT {RESOURCE_COLUMNS_NO_SNAPSHOT} FROM resources
             WHERE id = ?1 AND provider = ?2 AND kind = ?3"
        ))
        .map_err(direct_error)?;
    let mut by_alias = conn
        .prepare_cached(&format!(
            "SELECT {RESOURCE_COLUMNS_NO_SNAPSHOT} FROM resources WHERE rid =
                (SELECT rid FROM resource_aliases WHERE alias = ?1 AND provider = ?2 AND kind = ?3)"
        ))
        .map_err(direct_error)?;
    let params = |key: &str| (key.to_string(), obs.provider, obs.kind.clone());
    if let Some(found) = by_alias
        .query_row(params(&obs.id), resource_of_row)
        .optional()
        .map_err(direct_error)?
    {
        return Ok(Some(found));
    }
    for key in others {
        for statement in [&mut by_id, &mut by_alias] {
            let found = statement
                .query_row(params(key), resource_of_row)
                .optional()
                .map_err(direct_error)?;
            if found.is_some() {
                return Ok(found);
            }
        }
    }
    Ok(None)
}

/// Remembers `aliases` of the resource `rid` (those already taken stay
/// with the resource that has them).
pub fn add(
    conn: &rusqlite::Connection,
    rid: i64,
    provider: &str,
    kind: &str,
    aliases: &[String],
) -> Result<(), StoreError> {
    if aliases.is_empty() {
        return Ok(());
    }
    let mut insert = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO resource_aliases (alias, provider, kind, rid) VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(direct_error)?;
    for alias in aliases {
        insert
            .execute((alias, provider, kind, rid))
            .map_err(direct_error)?;
    }
    Ok(())
}

/// The resource known as `alias`, inside a write transaction.
pub async fn known_as(
    tx: &mut Tx<'_>,
    provider: &str,
    kind: &str,
    alias: &str,
) -> Result<Option<Resource>, StoreError> {
    sqlx::query_as::<_, Resource>(&format!(
        "SELECT {} FROM resources WHERE rid =
            (SELECT rid FROM resource_aliases WHERE alias = ? AND provider = ? AND kind = ?)",
        super::RESOURCE_COLUMNS
    ))
    .bind(alias)
    .bind(provider)
    .bind(kind)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}
