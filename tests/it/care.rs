//! Backups, restores and upgrades with the real binary, as
//! docs/operations.md tells an operator to do them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::binary::{self, BinaryDaemon};
use crate::support::config::WEBHOOK_SECRET;
use crate::support::db::{self, TestDb};
use crate::support::webhooks::{signed_now, thin_event};
use crate::support::{both_engines, wait_until, Engine, TestConfig};

/// The newest migration this binary knows for `engine`.
fn newest_migration(engine: Engine) -> i64 {
    let migrator = match engine {
        Engine::Sqlite => &cancelwatch::store::sqlite::MIGRATOR,
        Engine::Postgres => &cancelwatch::store::postgres::MIGRATOR,
    };
    migrator.iter().map(|m| m.version).max().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The deliveries a load sent and had acknowledged, by when their first
/// request went out relative to a backup.
#[derive(Default)]
struct Load {
    /// Acknowledged, in the order the answers came.
    acked: Vec<String>,
    /// First sent after the backup command had returned.
    sent_after_backup: BTreeSet<String>,
}

/// Sends distinct signed Stripe deliveries from `senders` tasks until `stop`
/// (at most `max_each` a task), each until acknowledged.
fn start_load(
    url: &str,
    senders: usize,
    max_each: usize,
    backup_done: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Load>>, tokio::task::JoinSet<()>) {
    let load = Arc::new(Mutex::new(Load::default()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for sender in 0..senders {
        let (load, client, backup_done, stop) = (
            load.clone(),
            client.clone(),
            backup_done.clone(),
            stop.clone(),
        );
        let url = format!("{url}/webhooks/stripe");
        tasks.spawn(async move {
            for n in 0..max_each {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let id = format!("evt_backup_{sender}_{n}");
                if backup_done.load(Ordering::SeqCst) {
                    load.lock().unwrap().sent_after_backup.insert(id.clone());
                }
                let body = thin_event(&id);
                let answer = client
                    .post(&url)
                    .header("Stripe-Signature", signed_now(WEBHOOK_SECRET, &body))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200, "{id} was not acknowledged");
                load.lock().unwrap().acked.push(id);
            }
        });
    }
    (load, tasks)
}

/// A backup taken while deliveries keep being acknowledged, restored the
/// documented way (daemon stopped, file copied into place, stale `-wal` and
/// `-shm` removed), holds every delivery acknowledged before the backup
/// started, and none first sent after it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_delivery_acknowledged_before_it() {
    // No API key: deliveries are stored and wait, so the inbox only grows.
    let config = TestConfig::new();
    let mut daemon = BinaryDaemon::start(&config).await;
    let backup_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (load, mut senders) = start_load(&daemon.url, 4, 2_000, backup_done.clone(), stop.clone());
    let acked_count = || load.lock().unwrap().acked.len();

    wait_until(
        "50 deliveries are acknowledged",
        Duration::from_secs(60),
        || std::future::ready(acked_count() >= 50),
    )
    .await;
    let before: Vec<String> = load.lock().unwrap().acked.clone();
    let backup = config.dir().join("backup.db");
    let backup_arg = backup.display().to_string();
    let backed_up = {
        let config = config.clone();
        let args = ["backup", "--to", &backup_arg].map(String::from);
        tokio::task::spawn_blocking(move || {
            binary::run(&config, &args.each_ref().map(String::as_str))
        })
        .await
        .unwrap()
    };
    backup_done.store(true, Ordering::SeqCst);
    let at_backup_end = acked_count();
    assert!(
        backed_up.status.success(),
        "backup failed: {}",
        text(&backed_up.stderr)
    );
    assert!(text(&backed_up.stdout).contains("backed up"));

    // The daemon kept acknowledging: deliveries sent after the backup too.
    wait_until(
        "20 more deliveries are acknowledged after the backup",
        Duration::from_secs(60),
        || std::future::ready(load.lock().unwrap().acked.len() >= at_backup_end + 20),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    while let Some(sender) = senders.join_next().await {
        sender.unwrap();
    }
    let load = std::mem::take(&mut *load.lock().unwrap());
    let after_backup: BTreeSet<&String> = load
        .acked
        .iter()
        .filter(|k| load.sent_after_backup.contains(*k))
        .collect();
    assert!(!after_backup.is_empty());
    eprintln!(
        "backup under load: {} acknowledged before it, {} while it ran, {} of {} after it",
        before.len(),
        at_backup_end - before.len(),
        after_backup.len(),
        load.acked.len()
    );

    // A second backup to the same file is refused and leaves it alone.
    let copy = std::fs::read(&backup).unwrap();
    let again = binary::run(&config, &["backup", "--to", &backup_arg]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("exists already"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(&backup).unwrap(), copy);

    // Restore: stop, copy into place, remove the stale WAL and shared memory.
    assert!(daemon.terminate().await.is_some_and(|s| s.success()));
    let path = config.database_path();
    std::fs::copy(&backup, &path).unwrap();
    for stale in ["-wal", "-shm"] {
        let mut name = path.clone().into_os_string();
        name.push(stale);
        match std::fs::remove_file(&name) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            removed => removed.unwrap(),
        }
    }
    let restored = BinaryDaemon::start(&config).await;
    let keys: BTreeSet<String> = db::deliveries(restored.db())
        .await
        .into_iter()
        .map(|d| d.dedupe_key)
        .collect();
    for key in &before {
        assert!(
            keys.contains(key),
            "{key} was acknowledged before the backup but is not restored"
        );
    }
    for key in &after_backup {
        assert!(
            !keys.contains(*key),
            "{key} was first sent after the backup, yet restored"
        );
    }
}

/// A database an older release left is migrated by this one: by
/// `cancelwatch migrate`, and by `serve` at start; what it held is kept.
#[tokio::test]
async fn a_newer_binary_migrates_an_older_database() {
    let every_migration: Vec<i64> = cancelwatch::store::sqlite::MIGRATOR
        .iter()
        .map(|m| m.version)
        .collect();
    for by_serve in [false, true] {
        let config = TestConfig::new();
        db::create_at_version(&config, 8).await;
        let old = TestDb::of(&config);
        db::seed_canceled_transfer_at_version_8(&old, "obt_old").await;
        assert_eq!(db::applied_migrations(&old).await.last(), Some(&8));

        if by_serve {
            let mut daemon = BinaryDaemon::start(&config).await;
            assert!(daemon.terminate().await.is_some_and(|s| s.success()));
        } else {
            let migrated = binary::run(&config, &["migrate"]);
            assert!(migrated.status.success(), "{}", text(&migrated.stderr));
            let said = text(&migrated.stdout);
            let want = format!("is at schema version {}", newest_migration(Engine::Sqlite));
            assert!(said.contains(&want), "{said}");
        }
        assert_eq!(db::applied_migrations(&old).await, every_migration);
        let history = binary::run(&config, &["history", "obt_old", "--json"]);
        assert!(history.status.success(), "{}", text(&history.stderr));
        let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
        let statuses: Vec<&str> = history["resources"][0]["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["to_status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses.len(), 2, "{history}");
        assert!(statuses.contains(&"canceled"), "{history}");
    }
}

both_engines! {
    /// A database a newer release migrated further is refused by this binary,
    /// naming both schema versions, and left as it was.
    #[tokio::test]
    async fn an_older_binary_refuses_a_database_migrated_further(engine) {
        let config = TestConfig::on(engine).await;
        let created = binary::run(&config, &["migrate"]);
        assert!(created.status.success(), "{}", text(&created.stderr));
        let db = TestDb::of(&config);
        let newer = newest_migration(engine) + 1;
        db::fake_newer_migration(&db, newer).await;
        let applied = db::applied_migrations(&db).await;

        let want = format!(
            "its schema is at version {newer}, newer than this cancelwatch ({}) knows (up to {})",
            env!("CARGO_PKG_VERSION"),
            newest_migration(engine)
        );
        // `backup` copies a SQLite file; on PostgreSQL the server's own
        // tools do (the command says so and stops before opening anything).
        let mut commands = vec![&["migrate"][..], &["serve"]];
        if engine == Engine::Sqlite {
            commands.push(&["backup", "--to", "b.db"]);
        }
        for args in commands {
            let refused = binary::run_to_exit(&config, args, Duration::from_secs(60)).await;
            let said = text(&refused.stderr);
            assert!(!refused.status.success(), "{args:?} went on: {said}");
            assert!(said.contains(&want), "{args:?}: {said}");
            assert!(said.contains("restore a backup"), "{said}");
        }
        assert_eq!(db::applied_migrations(&db).await, applied);
        assert!(!config.dir().join("b.db").exists());
    }
}
