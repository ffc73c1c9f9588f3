//! Keeping the WAL short and making acknowledged commits durable, beside
//! the writer connection rather than inside it.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{direct_error, CHECKPOINT_EVERY, CHECKPOINT_IDLE_EVERY};
use crate::store::StoreError;

/// Copies the WAL into the database file (a `PASSIVE` checkpoint) every
/// [`CHECKPOINT_EVERY`] while it grows (up to [`CHECKPOINT_IDLE_EVERY`]
/// apart while it does not), on a thread and a connection of its own.
///
/// Left to itself, the writer connection checkpoints once the WAL holds
/// [`WAL_CHECKPOINT_PAGES`], inside the commit that got there: at full load
/// end to end, half of the writer's time in commits went to those (about
/// 50 ms each, an acknowledgement or a record turn waiting behind it). A
/// passive checkpoint waits for no one, and writers go on appending to the
/// WAL while it copies. The writer still checkpoints at that size, but only
/// what came since the last pass is left to copy; and because a checkpoint
/// of the writer's own ends when nobody writes, SQLite can start the WAL
/// over from its beginning after it, so the WAL stays as small as before.
///
/// The connection runs at `synchronous = NORMAL`, like the others: a
/// checkpoint syncs the WAL before it copies and the database file after.
/// A pass with nothing new to copy does nothing.
#[derive(Debug)]
pub(super) struct Checkpointer {
    /// Dropped to stop the thread.
    stop: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path, busy_timeout_ms: u64) -> Result<Checkpointer, StoreError> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(direct_error)?;
        conn.busy_timeout(Duration::from_millis(busy_timeout_ms))
            .map_err(direct_error)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(direct_error)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cancelwatch-checkpoint".into())
            .spawn(move || {
                let mut failing = false;
                let mut held = HeldBack::default();
                let mut wait = CHECKPOINT_EVERY;
                let mut last = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(wait)
                {
                    // (busy, frames in the WAL, frames copied into the database)
                    let pass = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
                    });
                    match &pass {
                        Err(e) if !failing => tracing::warn!(error = %e, "checkpointing the WAL failed; the writer checkpoints it instead"),
                        Ok(_) if failing => tracing::info!("checkpointing the WAL works again"),
                        _ => {}
                    }
                    failing = pass.is_err();
                    if let Ok((frames, copied)) = pass {
                        held.pass((frames - copied).max(0) as u64, frames.max(0) as u64);
                    }
                    // The WAL moved since the last pass: keep pace with it.
                    let now = pass.as_ref().ok().copied();
                    wait = match now.is_some() && now != last {
                        true => CHECKPOINT_EVERY,
                        false => (wait * 2).min(CHECKPOINT_IDLE_EVERY),
                    };
                    last = now;
                }
            })
            .map_err(|e| StoreError::Sql(sqlx::Error::Io(e)))?;
        Ok(Checkpointer {
            stop: std::sync::Mutex::new(Some(stop)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Stops the thread and waits for it (at most the end of a pass).
    pub(super) fn stop(&self) {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// How long checkpoints may fall short before it is logged: a long read
/// (a backup, a big query) holds them back for a while, harmlessly.
const HELD_BACK_WARN_AFTER: Duration = Duration::from_secs(30);

/// Checkpoints that cannot complete: a reader (a read transaction open in
/// another process, an `sqlite3` shell left open) uses a snapshot older than
/// the WAL's end, so the frames after it can be neither copied nor the WAL
/// started over, and the WAL grows with every write. Reported in the gauge
/// `cancelwatch_wal_frames_behind` at every pass, logged once when it has
/// lasted [`HELD_BACK_WARN_AFTER`] and once when it ends. Once it ends, the
/// writer starts the WAL over and `journal_size_limit` cuts the file back.
#[derive(Debug, Default)]
struct HeldBack {
    since: Option<std::time::Instant>,
    warned: bool,
}

impl HeldBack {
    /// One pass's result: `behind` frames not copied of `frames` in the WAL.
    fn pass(&mut self, behind: u64, frames: u64) {
        metrics::gauge!("cancelwatch_wal_frames_behind").set(behind as f64);
        if behind == 0 {
            if self.warned {
                tracing::info!(
                    frames,
                    "checkpoints complete again; the WAL is cut back at its next start"
                );
            }
            *self = HeldBack::default();
            return;
        }
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if !self.warned && since.elapsed() >= HELD_BACK_WARN_AFTER {
            self.warned = true;
            tracing::warn!(
                behind,
                frames,
                secs = since.elapsed().as_secs(),
                "checkpoints cannot complete: a reader holds them back (an open read transaction in another process, such as an sqlite3 shell?), and the WAL grows until it ends"
            );
        }
    }
}

impl Drop for Checkpointer {
    /// The last [`Db`] is gone without [`Db::close`]: the thread stops at
    /// its next wake-up, unwaited.
    fn drop(&mut self) {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Durability for `synchronous = "full"`, outside the writer connection.
///
/// Every connection runs at `synchronous = NORMAL`: in WAL mode a commit
/// then appends its frames to the WAL file with `write()` and returns, and
/// only checkpoints sync. A commit whose frames reached the disk survives a
/// power loss (recovery replays the WAL up to its last whole commit), so
/// syncing the WAL file after the commit returned makes that commit, and
/// every one before it, durable. Doing that here rather than inside SQLite
/// (`synchronous = FULL`) keeps the one writer connection free while the
/// disk works: the pipeline writes during an acknowledgement's sync, and the
/// next group of acknowledgements is inserted while the last one syncs.
///
/// SQLite rewrites the WAL file in place after a checkpoint (which synced
/// everything before it) and deletes it only when the last connection
/// closes (the writer stays open), so the file is the one opened first (its
/// folder synced then, so that the file itself survives) for the daemon's
/// whole life. Should another file stand at its path (the first moved or
/// deleted under the daemon, and a connection opened since started a new
/// one), the writer still commits to the first: syncing the new one would
/// prove nothing, so every sync fails until the first is back.
///
/// A failed `fdatasync` is final: Linux may drop the pages it could not
/// write and report success at the next one, so a commit written before the
/// failure could be acknowledged later (as a duplicate of its retry) without
/// being on disk. After one, every sync fails, the deliveries are refused,
/// and the daemon needs a restart (which recovers from the WAL).
#[derive(Debug)]
pub struct WalSync {
    path: std::path::PathBuf,
    pub(super) file: std::sync::Mutex<Option<(std::fs::File, u64)>>,
    /// Set at the first failed sync; every sync after it fails too.
    failed: std::sync::atomic::AtomicBool,
    /// Threads in [`Db::sync_commits`] at once: now, and the most.
    #[cfg(test)]
    pub(super) threads: (
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    ),
    /// Syncs made.
    #[cfg(test)]
    pub(super) synced: std::sync::atomic::AtomicUsize,
}

impl WalSync {
    pub(super) fn open(db_path: &Path) -> Result<WalSync, StoreError> {
        let mut path = db_path.as_os_str().to_owned();
        path.push("-wal");
        let wal = WalSync {
            path: path.into(),
            file: std::sync::Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            threads: Default::default(),
            #[cfg(test)]
            synced: Default::default(),
        };
        wal.sync().map_err(StoreError::Sync)?;
        Ok(wal)
    }

    /// Syncs the WAL file as it is now (blocking). Once `fdatasync` itself
    /// has failed, every sync fails (a WAL file that could not be found,
    /// opened, or was replaced is not such a failure: nothing was lost, and
    /// the next sync tries again).
    pub fn sync(&self) -> std::io::Result<()> {
        self.sync_with(|f| f.sync_data())
    }

    /// True once `fdatasync` has failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// [`WalSync::sync`], with `sync_data` doing the `fdatasync`.
    pub(super) fn sync_with(
        &self,
        sync_data: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if self.failed() {
            return Err(std::io::Error::other(
                "an earlier sync of the WAL failed; restart the daemon to recover",
            ));
        }
        let current = std::fs::metadata(&self.path)?.ino();
        match &*file {
            Some((_, first)) if *first != current => {
                return Err(std::io::Error::other(
                    "the WAL file was replaced under the daemon; the commits are in the one it opened first",
                ));
            }
            Some(_) => {}
            None => {
                let opened = std::fs::OpenOptions::new().write(true).open(&self.path)?;
                let ino = opened.metadata()?.ino();
                if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                *file = Some((opened, ino));
            }
        }
        let (f, _) = file.as_ref().expect("opened above");
        let synced = sync_data(f);
        #[cfg(test)]
        self.synced.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = &synced {
            tracing::error!(error = %e, "fdatasync of the WAL failed: no delivery is acknowledged any more until the daemon restarts");
            self.failed.store(true, Ordering::SeqCst);
        }
        synced
    }
}
