//! The real daemon in-process on 127.0.0.1:0 (`cancelwatch::run_on`),
//! and what a test does with it.

use std::time::Duration;

use cancelwatch::providers::stripe::signature;
use cancelwatch::Config;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::config::{TestConfig, WEBHOOK_SECRET};
use super::db::TestDb;
use super::wait::wait_until;

/// A loopback address taken before the daemon starts on it (so that a
/// simulator can be told where to deliver first).
pub struct Address {
    listener: TcpListener,
    pub url: String,
}

impl Address {
    pub async fn bind() -> Address {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        Address { listener, url }
    }

    /// Starts the daemon here and waits until it is ready. A configuration
    /// with a `server.admin_listen` gets the admin surface on a second free
    /// loopback port instead ([`TestApp::admin_url`]).
    pub async fn start(self, config: TestConfig) -> TestApp {
        let (stop, stopped) = oneshot::channel::<()>();
        let admin = if config.config().server.admin_listen.is_empty() {
            None
        } else {
            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
        };
        let admin_url = match &admin {
            Some(l) => format!("http://{}", l.local_addr().unwrap()),
            None => self.url.clone(),
        };
        let task = tokio::spawn(cancelwatch::run_with_admin(
            config.config().clone(),
            self.listener,
            admin,
            async {
                let _ = stopped.await;
            },
        ));
        ready(self.url, admin_url, config, stop, task).await
    }

    /// [`Address::start`] on a store the test opened (and keeps a handle
    /// to, to reach into the engine while the daemon runs).
    pub async fn start_on(self, config: TestConfig, store: cancelwatch::store::Store) -> TestApp {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cancelwatch::run_on(
            config.config().clone(),
            store,
            self.listener,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        ready(self.url.clone(), self.url, config, stop, task).await
    }
}

/// The daemon `task` started at `url`, once it is ready.
async fn ready(
    url: String,
    admin_url: String,
    config: TestConfig,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
) -> TestApp {
    let app = TestApp {
        url,
        admin_url,
        db: TestDb::of(&config),
        config,
        client: reqwest::Client::new(),
        stop: Some(stop),
        task: Some(task),
    };
    let ready = format!("{}/readyz", app.url);
    wait_until("the daemon is ready", Duration::from_secs(20), || async {
        let answer = app.client.get(&ready).send().await;
        answer.is_ok_and(|r| r.status().is_success())
    })
    .await;
    app
}

/// A running daemon; dropped without [`TestApp::stop`], it stops on its own.
pub struct TestApp {
    pub url: String,
    /// Where `/ui/`, `/v1` and `/metrics` answer: `url` unless the
    /// configuration moved them to an address of their own.
    pub admin_url: String,
    config: TestConfig,
    db: TestDb,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    /// Starts a daemon with `config` on a free loopback port, ready.
    pub async fn start(config: TestConfig) -> TestApp {
        Address::bind().await.start(config).await
    }

    /// [`TestApp::start`] on a store the test opened: see [`Address::start_on`].
    pub async fn start_on(config: TestConfig, store: cancelwatch::store::Store) -> TestApp {
        Address::bind().await.start_on(config, store).await
    }

    pub fn config(&self) -> &Config {
        self.config.config()
    }

    pub fn test_config(&self) -> &TestConfig {
        &self.config
    }

    /// Its database, for fixtures and checks.
    pub fn db(&self) -> &TestDb {
        &self.db
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Posts a Stripe delivery signed now with the test secret.
    pub async fn post_stripe(&self, body: &[u8]) -> (u16, Value) {
        let header = signature::sign_header(WEBHOOK_SECRET, chrono::Utc::now().timestamp(), body);
        self.post_stripe_with(body, Some(&header)).await
    }

    /// Posts a Stripe delivery with this `Stripe-Signature` header, if any.
    pub async fn post_stripe_with(&self, body: &[u8], header: Option<&str>) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}/webhooks/stripe", self.url))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(h) = header {
            req = req.header("Stripe-Signature", h);
        }
        answer(req).await
    }

    /// Posts a Juice delivery (its checksum is in the body).
    pub async fn post_juice(&self, body: Vec<u8>) -> (u16, Value) {
        answer(
            self.client
                .post(format!("{}/webhooks/juice", self.url))
                .body(body),
        )
        .await
    }

    /// GET `path`, with this bearer token if any.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.client.get(format!("{}{path}", self.admin_url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        answer(req).await
    }

    /// POST `path` with this JSON body and bearer token, if any.
    pub async fn post(&self, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
        let mut req = self.client.post(format!("{}{path}", self.admin_url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req).await
    }

    /// What `/metrics` shows now.
    pub async fn metrics(&self) -> String {
        let r = self
            .client
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.text().await.unwrap()
    }

    /// One series of `/metrics` (0 while it is not there).
    pub async fn metric(&self, series: &str) -> u64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// Stops the daemon (within 30 s) and gives back its configuration, with
    /// the folder and database, to start it again or look inside.
    pub async fn stop(mut self) -> TestConfig {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the daemon stops within 30 s")
                .unwrap()
                .unwrap();
        }
        self.config.clone()
    }
}

/// The status and JSON body (Null when there is none) of a request.
async fn answer(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}
