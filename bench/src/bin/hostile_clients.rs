//! Hostile clients against a running daemon, on loopback, for a bounded
//! time, and what a health check and a signed-looking request meet
//! meanwhile:
//!
//! - `unread`: connections that pipeline requests and never read the
//!   answers (held forever by a server with no write deadline);
//! - `idle`: connections opened and left silent, more than the cap.
//!
//! The hostile connections come from 127.0.0.2, the health checks from
//! 127.0.0.1.
//!
//! ```sh
//! target/release/cancelwatch serve &          # 127.0.0.1:8080 by default
//! cargo run --release -p cancelwatch-bench --bin hostile_clients -- unread 127.0.0.1:8080 2100 30 $(pgrep -f 'cancelwatch serve')
//! cargo run --release -p cancelwatch-bench --bin hostile_clients -- idle 127.0.0.1:8080 3000 30
//! ```
//!
//! Arguments: mode, address, connections, seconds to hold them, optional
//! pid (for the daemon's memory). Loopback only; it stops by itself.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[path = "../probe.rs"]
mod probe;
use probe::{healthz, memory};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("unread");
    let addr: SocketAddr = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("127.0.0.1:8080")
        .parse()?;
    anyhow::ensure!(addr.ip().is_loopback(), "loopback addresses only");
    let connections: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2_100);
    let seconds: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let pid: Option<u32> = args.get(4).map(|s| s.parse()).transpose()?;
    anyhow::ensure!(seconds <= 600, "at most 600 seconds");

    let started = Instant::now();
    let mut open = Vec::with_capacity(connections);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for _ in 0..connections {
        match runtime.block_on(connect_from(HOSTILE_SOURCE, addr)) {
            Ok(s) => open.push(s),
            Err(e) => {
                println!("connect failed after {} connections: {e}", open.len());
                break;
            }
        }
    }
    if mode == "unread" {
        let burst = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
        for s in &mut open {
            // Until the socket takes no more (the daemon's answers back up
            // unread), at most 1,000 bursts a connection.
            s.set_nonblocking(true)?;
            for _ in 0..1_000 {
                if s.write(&burst).map_or(true, |n| n < burst.len()) {
                    break;
                }
            }
            s.set_nonblocking(false)?;
        }
    } else {
        anyhow::ensure!(mode == "idle", "mode: unread or idle");
    }
    println!(
        "{mode}: {} connections set up in {:.1} s; {}",
        open.len(),
        started.elapsed().as_secs_f64(),
        memory(pid)
    );

    let held = Instant::now();
    let mut probes = Vec::new();
    while held.elapsed() < Duration::from_secs(seconds) {
        probes.push(healthz(addr));
        std::thread::sleep(Duration::from_secs(1));
    }
    let answered: Vec<f64> = probes
        .iter()
        .filter_map(|p| p.as_ref().ok().copied())
        .collect();
    let worst = answered.iter().copied().fold(0.0, f64::max);
    let mut closed = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for s in &mut open {
        s.set_read_timeout(Some(Duration::from_millis(5)))?;
        // Drain what was answered; EOF or an error means the daemon closed it.
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    println!(
        "held {seconds} s more: {closed} of {} closed by the daemon; /healthz answered {} of {} probes, slowest {worst:.1} ms; {}",
        open.len(),
        answered.len(),
        probes.len(),
        memory(pid)
    );
    Ok(())
}

/// The hostile connections come from this loopback address, the health
/// checks from the usual one: two sources, as in the field.
const HOSTILE_SOURCE: &str = "127.0.0.2";

/// A connection to `addr` from `source`, within 2 s.
async fn connect_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // A small window: the daemon's answers back up after a few of them.
    socket.set_recv_buffer_size(4096)?;
    socket.bind(SocketAddr::new(
        source.parse().expect("a literal address"),
        0,
    ))?;
    let stream = tokio::time::timeout(Duration::from_secs(2), socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "connect timed out"))??;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}
