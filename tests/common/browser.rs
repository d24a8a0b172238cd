//! A headless Chromium for tests that must see a page as a browser does (the HTML load-test
//! report's charts): a `chromedriver` child on a free loopback port, driven over WebDriver with
//! `fantoccini`.
//!
//! Browsers are not on every developer's machine, so [`Browser::start`] returns `None` (and says
//! why on stderr) when Chromium or chromedriver is missing, and the test skips. On CI
//! (`CI=true`) a missing browser is a failure instead, so a broken image never turns the browser
//! tests into silent passes.
//!
//! ```ignore
//! let Some(browser) = Browser::start().await else { return };
//! browser.goto(&format!("file://{}", path.display())).await;
//! let chart = browser.wait_for("#latency svg", PATIENCE).await;
//! browser.close().await;
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// Where Debian's `chromium` package puts the browser; elsewhere chromedriver finds its own.
const CHROMIUM: &str = "/usr/bin/chromium";
/// How long chromedriver may take to answer and open a session.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// What to install when the browser is missing.
const INSTALL: &str = "apt-get install chromium chromium-driver (Debian), or put chromedriver \
and a matching Chrome/Chromium on PATH";

/// A headless Chromium session and the chromedriver that runs it. Dropping it ends the session
/// and kills that chromedriver (its own child, by handle); [`Browser::close`] does the same and
/// waits for the session to end.
pub struct Browser {
    client: Option<Client>,
    driver: Child,
    port: u16,
    session: Option<String>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session (window 1400×1000). `None`, after
    /// saying why on stderr, when chromedriver or the browser is missing or cannot start; with
    /// `CI=true` that panics instead, naming what to install.
    pub async fn start() -> Option<Browser> {
        let skip = |why: String| -> Option<Browser> {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("browser test on CI: {why}; install it: {INSTALL}");
            }
            eprintln!("skipped: {why} (install: {INSTALL})");
            None
        };
        let Some(driver_bin) = on_path("chromedriver") else {
            return skip("chromedriver is not on PATH".into());
        };
        let binary = Path::new(CHROMIUM)
            .exists()
            .then(|| CHROMIUM.to_string())
            .or_else(|| {
                ["chromium", "chromium-browser", "google-chrome"]
                    .iter()
                    .find_map(|b| on_path(b).map(|p| p.display().to_string()))
            });
        let Some(binary) = binary else {
            return skip("no chromium (or chrome) browser found".into());
        };
        let port = free_port();
        let driver = match Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => return skip(format!("{} does not start: {e}", driver_bin.display())),
        };
        let mut browser = Browser {
            client: None,
            driver,
            port,
            session: None,
        };
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": binary,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + START_TIMEOUT;
        let client = loop {
            let attempt = ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await;
            match attempt {
                Ok(client) => break client,
                Err(e) if Instant::now() > deadline => {
                    return skip(format!("no browser session from chromedriver: {e}"));
                }
                // Not listening yet (the usual case for the first few tries).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        browser.session = client.session_id().await.ok().flatten();
        browser.client = Some(client);
        Some(browser)
    }

    /// The WebDriver client, for anything the helpers do not cover.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("session open")
    }

    /// Opens `url` (`http://…` or `file://…`) and waits for it to load; panics on failure.
    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The first element matching the CSS `selector`, once there; panics after `timeout`.
    pub async fn wait_for(&self, selector: &str, timeout: Duration) -> Element {
        self.client()
            .wait()
            .at_most(timeout)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no {selector:?} within {timeout:?}: {e}"))
    }

    /// Every element matching the CSS `selector` now (possibly none).
    pub async fn find_all(&self, selector: &str) -> Vec<Element> {
        self.client()
            .find_all(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("find {selector:?}: {e}"))
    }

    /// Runs `script` (a function body: `return …` gives the value) with `args` as
    /// `arguments[i]`; its JSON result. Panics when the script throws.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.client()
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Writes a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client().screenshot().await.expect("screenshot");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Ends the session (the browser quits) and stops chromedriver.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
        self.session = None;
        // Drop kills the chromedriver.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Drop cannot wait for fantoccini's async shutdown (and the runtime may be going away),
        // so the session is deleted with one plain request: chromedriver then quits the browser.
        if let Some(session) = self.session.take() {
            delete_session(self.port, &session);
        }
        drop(self.client.take());
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `DELETE /session/{id}` on the chromedriver at `port`, waiting at most a few seconds.
fn delete_session(port: u16, session: &str) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        let _ = stream.read_to_end(&mut Vec::new());
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `name`'s path in `$PATH`, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
