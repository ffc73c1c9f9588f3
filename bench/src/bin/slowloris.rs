//! Slow clients against a running daemon: opens many connections that each
//! send the start of a webhook request and then one header byte a second,
//! and reports how many the daemon cut off, whether `/healthz` still answers
//! meanwhile, and (given the daemon's pid) its resident memory.
//!
//! ```sh
//! target/release/cancelwatch serve &          # listens on 127.0.0.1:8080 by default
//! cargo run --release -p cancelwatch-bench --bin slowloris -- 127.0.0.1:8080 1500 15 $(pgrep -f 'cancelwatch serve')
//! ```
//!
//! Arguments: address, connections, seconds to trickle, optional pid.
//! Loopback only; it stops by itself after the given seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[path = "../probe.rs"]
mod probe;
use probe::{healthz, memory};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: SocketAddr = args
        .first()
        .map(String::as_str)
        .unwrap_or("127.0.0.1:8080")
        .parse()?;
    anyhow::ensure!(addr.ip().is_loopback(), "loopback addresses only");
    let connections: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1_000);
    let seconds: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(15);
    let pid: Option<u32> = args.get(3).map(|s| s.parse()).transpose()?;

    let mut open = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.write_all(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
        )?;
        s.set_read_timeout(Some(Duration::from_millis(5)))?;
        open.push(s);
    }
    println!("{} slow connections open; {}", open.len(), memory(pid));

    let started = Instant::now();
    let mut healthz_ms = None;
    while started.elapsed() < Duration::from_secs(seconds) {
        for s in &mut open {
            // Errors mean the daemon closed it: counted below.
            let _ = s.write_all(b"X");
        }
        if healthz_ms.is_none() && started.elapsed() >= Duration::from_secs(2) {
            healthz_ms = Some(healthz(addr));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut cut_off = 0;
    let mut buf = [0u8; 64];
    for s in &mut open {
        match s.read(&mut buf) {
            // Closed, or answered (408) and closed.
            Ok(_) => cut_off += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => cut_off += 1,
        }
    }
    println!(
        "after {seconds} s: {cut_off} of {} cut off by the daemon; /healthz meanwhile: {}; {}",
        open.len(),
        match healthz_ms {
            Some(Ok(ms)) => format!("answered in {ms:.1} ms"),
            Some(Err(e)) => format!("failed: {e}"),
            None => "not tried".into(),
        },
        memory(pid)
    );
    Ok(())
}
