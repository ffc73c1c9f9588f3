//! The load itself: unique thin events, posted over keep-alive connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;

/// A unique thin event about an outbound transfer that does not exist: the
/// front door does not care, and the daemon's provider API is a closed port.
/// Its ids are scattered like a provider's random ones (a bijection of `n`,
/// so still unique): sequential ids would put each group's keys on a few
/// neighbouring pages of the inbox's unique index, which real traffic
/// never does.
pub fn delivery(run_tag: &str, n: u64) -> Vec<u8> {
    let id = format!("{:016x}", scatter(n));
    format!(
        concat!(
            r#"{{"id":"evt_bench_{tag}_{id}","object":"v2.core.event","#,
            r#""type":"v2.money_management.outbound_transfer.canceled","created":"2026-10-30T12:00:00.000Z","#,
            r#""livemode":false,"related_object":{{"id":"obt_bench_{id}","type":"v2.money_management.outbound_transfer","#,
            r#""url":"/v2/money_management/outbound_transfers/obt_bench_{id}"}}}}"#
        ),
        tag = run_tag,
        id = id
    )
    .into_bytes()
}

/// SplitMix64's finalizer: a bijection of `u64` that scatters neighbours.
fn scatter(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    /// Counts an answer; true when it accepted a new delivery.
    pub fn record(&self, answer: anyhow::Result<(StatusCode, Bytes)>) -> bool {
        let (counter, accepted) = match answer {
            Ok((status, body)) if status.is_success() => {
                if body.windows(16).any(|w| w == b"\"duplicate\":true") {
                    (&self.duplicates, false)
                } else {
                    (&self.accepted, true)
                }
            }
            Ok((status, _)) if status.is_client_error() => (&self.refused, false),
            _ => (&self.errors, false),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        accepted
    }
}

/// One keep-alive HTTP/1.1 connection of the load generator to the daemon,
/// straight on hyper. reqwest's pool, URL parsing and per-request plumbing
/// cost the load generator about 65 µs of CPU a request, most of what the
/// daemon itself spent on one, on the same two cores; this costs a fraction.
/// A connection that fails is dropped and opened again on the next request.
pub struct Connection {
    addr: std::net::SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Connection {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    /// POSTs a signed delivery to `/webhooks/stripe`: the answer's status
    /// and body, within 30 s.
    pub async fn post_delivery(
        &mut self,
        signature: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let request = hyper::Request::post("/webhooks/stripe")
            .header(hyper::header::HOST, self.addr.to_string())
            .header("stripe-signature", signature)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let answer = tokio::time::timeout(Duration::from_secs(30), self.send(request)).await;
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                bail!("no answer within 30 s")
            }
        }
    }

    async fn send(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let stream = tokio::net::TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                self.sender.insert(sender)
            }
        };
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_unique_thin_events() {
        let a = delivery("t", 1);
        let b = delivery("t", 2);
        assert_ne!(a, b);
        let e: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let id = format!("{:016x}", scatter(1));
        assert_eq!(e["id"], format!("evt_bench_t_{id}"));
        assert_eq!(e["object"], "v2.core.event");
        assert_eq!(e["type"], "v2.money_management.outbound_transfer.canceled");
        assert_eq!(e["related_object"]["id"], format!("obt_bench_{id}"));
        assert_eq!(
            e["related_object"]["url"],
            format!("/v2/money_management/outbound_transfers/obt_bench_{id}")
        );
        // Neighbours land far apart, and none of many collide.
        assert!(scatter(1).abs_diff(scatter(2)) > 1 << 32);
        let ids: std::collections::HashSet<u64> = (0..100_000).map(scatter).collect();
        assert_eq!(ids.len(), 100_000);
    }
}
