//! What the hostile-client tools (`slowloris`, `hostile_clients`) measure
//! on the daemon meanwhile: a health check's time, the daemon's memory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Milliseconds for a `GET /healthz` answered 200, within 5 s.
pub fn healthz(addr: SocketAddr) -> Result<f64, String> {
    let started = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    } else {
        Err(String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned())
    }
}

/// The daemon's resident and peak resident memory, from `/proc`.
pub fn memory(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "memory: no pid given".into();
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!("daemon RSS {}, peak {}", field("VmRSS:"), field("VmHWM:"))
}
