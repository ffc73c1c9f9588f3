//! A webhook receiver on 127.0.0.1: stands in for an alert sink, or for a
//! daemon the simulator delivers to. Records every request and answers as
//! told.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

/// One request as the receiver saw it, with the status it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The last segment of the path (`/webhooks/<provider>`).
    pub fn provider(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default()
    }
}

#[derive(Default)]
struct Script {
    received: Vec<Received>,
    /// Statuses answered first, in order.
    first: VecDeque<u16>,
    /// Then this one (200 unless told).
    then: Option<u16>,
    /// While true, every request is answered 503.
    down: bool,
    /// Never answer.
    hang: bool,
}

/// A receiver listening on a loopback port of its own.
#[derive(Clone)]
pub struct TestReceiver {
    script: Arc<Mutex<Script>>,
    url: String,
}

impl TestReceiver {
    /// Starts one that answers every request (on any path) with 200.
    pub async fn start() -> TestReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = TestReceiver {
            script: Arc::default(),
            url: format!("http://{}", listener.local_addr().unwrap()),
        };
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(receiver.script.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    /// Its base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Answers the next requests with these statuses, in order.
    pub fn answer_first(&self, statuses: &[u16]) {
        self.script.lock().unwrap().first.extend(statuses);
    }

    /// Answers with `status` once the scripted first answers are used up.
    pub fn answer_then(&self, status: u16) {
        self.script.lock().unwrap().then = Some(status);
    }

    /// While down, every request is answered 503.
    pub fn set_down(&self, down: bool) {
        self.script.lock().unwrap().down = down;
    }

    /// Never answers from now on.
    pub fn hang(&self) {
        self.script.lock().unwrap().hang = true;
    }

    /// Every request so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.script.lock().unwrap().received.clone()
    }
}

async fn receive(State(script): State<Arc<Mutex<Script>>>, request: Request) -> StatusCode {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let (status, hang) = {
        let mut s = script.lock().unwrap();
        let status = if s.down {
            503
        } else {
            s.first.pop_front().or(s.then).unwrap_or(200)
        };
        s.received.push(Received {
            path: parts.uri.path().to_string(),
            headers: parts.headers,
            body,
            status,
        });
        (status, s.hang)
    };
    if hang {
        std::future::pending::<()>().await;
    }
    StatusCode::from_u16(status).unwrap()
}
