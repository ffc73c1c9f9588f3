//! The replica's own connection, kept open while the process lives: its
//! backend, registered in `replicas`, is how the other replicas tell this
//! one is alive (a killed process's connection closes with it, and its
//! backend leaves `pg_stat_activity` at once); and the session advisory
//! lock [`super::LEADER_LOCK`] on it makes this replica the leader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::LEADER_LOCK;

/// How often the keeper checks its connection and, when not the leader,
/// tries to become it: a dead leader is replaced within about this long.
const BEAT: Duration = Duration::from_millis(500);

/// What the keeper tells the rest of the engine.
#[derive(Debug, Default)]
pub struct Standing {
    /// This replica holds the leader lock.
    pub leader: AtomicBool,
    /// The keeper's connection is up and registered, and has tried for the
    /// leadership at least once (so a lone replica leads by the time its
    /// store is open, and the jobs that run at start find it leading).
    /// False again once the keeper has closed its connection for good.
    pub registered: AtomicBool,
}

/// Keeps the connection until `stop` is cancelled; connects again after a
/// failure. Leadership is given up (`leader` false) the moment the
/// connection is in doubt: another replica may then hold the lock.
pub async fn run(url: String, owner: Uuid, standing: Arc<Standing>, stop: CancellationToken) {
    let mut conn: Option<PgConnection> = None;
    loop {
        let beat = async {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    let mut c = PgConnection::connect(&url).await?;
                    register(&mut c, owner).await?;
                    conn.insert(c)
                }
            };
            if standing.leader.load(Ordering::SeqCst) {
                sqlx::query("SELECT 1").execute(&mut *c).await?;
            } else {
                let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(LEADER_LOCK)
                    .fetch_one(&mut *c)
                    .await?;
                if won {
                    tracing::info!(%owner, "this replica is the leader: it runs the reconciler, the alert scans, the outbox and the pruner");
                    standing.leader.store(true, Ordering::SeqCst);
                }
            }
            standing.registered.store(true, Ordering::SeqCst);
            Ok::<_, sqlx::Error>(())
        };
        if let Err(e) = beat.await {
            if standing.leader.swap(false, Ordering::SeqCst) {
                tracing::warn!(error = %e, "lost the connection that holds the leadership; another replica may lead now");
            } else {
                tracing::warn!(error = %e, "the replica's own database connection failed; connecting again");
            }
            standing.registered.store(false, Ordering::SeqCst);
            conn = None;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
    let led = standing.leader.swap(false, Ordering::SeqCst);
    if let Some(mut c) = conn {
        // Unlocked in so many words: the server drops a closed session's
        // locks only once it has noticed the close.
        if led {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(LEADER_LOCK)
                .execute(&mut c)
                .await;
        }
        let _ = sqlx::query("DELETE FROM replicas WHERE owner = $1")
            .bind(owner)
            .execute(&mut c)
            .await;
        let _ = c.close().await;
    }
    // The connection, and with it the leader lock, is gone: see
    // `PgStore::close`, which waits for this.
    standing.registered.store(false, Ordering::SeqCst);
}

/// Registers this connection's backend as `owner`'s, and forgets replicas
/// whose backend is gone.
async fn register(c: &mut PgConnection, owner: Uuid) -> Result<(), sqlx::Error> {
    let host = std::env::var("HOSTNAME").ok();
    sqlx::query(
        "INSERT INTO replicas (owner, backend_pid, backend_start, host)
         SELECT $1, pid, backend_start, $2 FROM pg_stat_activity WHERE pid = pg_backend_pid()
         ON CONFLICT (owner) DO UPDATE
             SET backend_pid = excluded.backend_pid, backend_start = excluded.backend_start",
    )
    .bind(owner)
    .bind(host)
    .execute(&mut *c)
    .await?;
    sqlx::query(&format!("DELETE FROM replicas r WHERE NOT {}", alive("r")))
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// The SQL condition that the replica of the `replicas` row `r` is alive:
/// its keeper's backend still runs.
pub fn alive(r: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_stat_activity a
                 WHERE a.pid = {r}.backend_pid AND a.backend_start = {r}.backend_start)"
    )
}
