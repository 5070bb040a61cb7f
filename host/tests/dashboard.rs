//! The operators' dashboard in a real headless browser (Chromium from
//! Debian's packages, driven over WebDriver by `chromedriver`): the page
//! loads, shows the simulator's surge as an overload alert and a tariff
//! change as they happen, and acknowledging the alert in the page changes it
//! in the store. A screenshot goes to the test's output folder
//! (`target/tmp/dashboard/`).
//!
//! Needs `chromium` and `chromium-driver` (`cargo xtask test` installs them
//! when missing) and `cargo xtask build-plugins`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use segs::app::App;
use segs::simulator::Simulator;
use serde_json::{Value, json};

/// A `chromedriver` on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver() -> Driver {
    let port = common::free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start chromedriver ({e}): install Debian's `chromium` and \
                 `chromium-driver` (`cargo xtask test` does)"
            )
        });
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(r) = client.get(format!("{}/status", driver.url)).send().await {
            if r.status().is_success() {
                return driver;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer on {}", driver.url);
}

/// One WebDriver session.
struct Browser {
    client: reqwest::Client,
    session: String,
}

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = req.send().await.unwrap();
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
    }

    async fn open(driver: &Driver) -> Browser {
        let client = reqwest::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }
        }}});
        let r = client
            .post(format!("{}/session", driver.url))
            .header("content-type", "application/json")
            .body(caps.to_string())
            .send()
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_owned();
        Browser {
            client,
            session: format!("{}/session/{id}", driver.url),
        }
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The element `css` selects now, if any.
    async fn find(&self, css: &str) -> Option<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        let obj = v["value"].as_object()?;
        if obj.contains_key("error") {
            return None;
        }
        obj.values()
            .next()
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// The element `css` selects, once it exists (a hang guard of 60 s).
    async fn wait_for(&self, css: &str) -> String {
        for _ in 0..600 {
            if let Some(id) = self.find(css).await {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no element {css} within 60 s");
    }

    async fn text(&self, element: &str) -> String {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{element}/text"),
                None,
            )
            .await;
        v["value"].as_str().unwrap_or_default().to_owned()
    }

    async fn click(&self, element: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap()
    }

    async fn close(self) {
        self.call(reqwest::Method::DELETE, "", None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_surge_live_and_acknowledges_an_alert() {
    let driver = start_driver().await;
    let dir = tempfile::tempdir().unwrap();
    let sim_cfg = common::sim_config(23);
    let mut sim = Simulator::new(sim_cfg.clone()).unwrap();
    let surged = sim_cfg.regions[0].clone();
    let cfg = common::embedded_config(dir.path(), &sim);
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", app.addr);

    // The page first, then the stream: what it shows comes live.
    let browser = Browser::open(&driver).await;
    browser.goto(&format!("{url}/")).await;
    let live = browser.wait_for("#live").await;
    for _ in 0..100 {
        if browser.text(&live).await == "live" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = reqwest::Client::new();
    common::post_ticks(&client, &url, &mut sim, 0..72).await;

    // The surge: regional load, an overload alert and a tariff change.
    browser
        .wait_for(&format!("#regions tr[data-region=\"{surged}\"]"))
        .await;
    browser
        .wait_for(&format!(
            "#alerts tr[data-type=\"OVERLOAD\"][data-status=\"active\"][data-region=\"{surged}\"]"
        ))
        .await;
    browser
        .wait_for(&format!("#tariffs-current tr[data-region=\"{surged}\"]"))
        .await;
    browser.wait_for("#tariffs-history tr[data-tariff]").await;

    // Acknowledge it in the page: the store has it acknowledged by the
    // dashboard, and the page shows it.
    // (The page re-renders as events arrive, which can replace the button
    // between finding and clicking it: click again until it took.)
    let acknowledged = "#alerts tr[data-type=\"OVERLOAD\"][data-status=\"acknowledged\"]";
    for attempt in 0.. {
        assert!(attempt < 100, "the acknowledgement never showed");
        if browser.find(acknowledged).await.is_some() {
            break;
        }
        if let Some(button) = browser
            .find("#alerts tr[data-type=\"OVERLOAD\"] button.ack")
            .await
        {
            browser.click(&button).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let error = browser.wait_for("#error").await;
    assert_eq!(browser.text(&error).await, "", "the page reported an error");
    let store = app.ctx.store.clone();
    let stored = common::all_alerts(&*store).await;
    let alert = stored.iter().find(|a| a.alert_type == "OVERLOAD").unwrap();
    assert_eq!(alert.status, "acknowledged");
    assert_eq!(alert.acknowledged_by.as_deref(), Some("dashboard"));

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("dashboard.png"), &png).unwrap();
    browser.close().await;
    app.shutdown().await;
}
