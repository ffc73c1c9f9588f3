//! Progress of long commands (`backfill`, `prune`, a slow `cancel`) on
//! stderr: a spinner saying what is being done and for how long, on a
//! terminal only. Piped or written to a file, stderr gets none of it, and
//! stdout, which carries the result, never does.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A spinner that stays until dropped, then leaves no trace on the screen.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Shows `what` with a spinner and the time taken so far, when stderr
    /// is a terminal; otherwise nothing.
    pub fn start(what: impl Into<Cow<'static, str>>) -> Progress {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"),
        );
        bar.set_message(what);
        // Drawn at once, so that even a short operation shows what it did.
        bar.tick();
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar }
    }

    /// True when it is drawn (stderr is a terminal).
    pub fn is_shown(&self) -> bool {
        !self.bar.is_hidden()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `work` with a [`Progress`] saying `what`.
pub async fn during<T>(
    what: impl Into<Cow<'static, str>>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let _progress = Progress::start(what);
    work.await
}
