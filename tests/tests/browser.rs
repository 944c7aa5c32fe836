//! The gateway in a real browser (issue 23): headless Chromium, driven over WebDriver
//! (chromedriver), loads a page from one origin whose `EventSource`s read `/events` from another
//! (CORS) through a small TCP proxy in front of two gateway instances, as a Kubernetes Service
//! would be. The instance serving the page is killed (`kill -9`); events are published while the
//! page is disconnected; the browser's own reconnect (its `Last-Event-ID`, no code of the page's)
//! reaches the other instance, which resumes from the projector's history. The page must end with
//! every event exactly once, in order per flow.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/services installs them); without them
//! the test fails and says how to install them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fantoccini::wd::Capabilities;
use serde_json::{json, Value};
use streamfleet_tests::gateway::{history_holds, token, Fleet};
use streamfleet_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Generous: a 2-core CI machine starting Chromium beside the fleet.
const WAIT: Duration = Duration::from_secs(30);
/// The flows the page follows, one `EventSource` each; their events are published interleaved.
const FLOWS: [usize; 2] = [1, 2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_resumes_on_another_instance_after_a_kill_with_every_event_once_in_order() {
    let chromium = installed("chromium");
    let chromedriver = installed("chromedriver");

    // The fleet: a projector (the history a resume reads) and a notifier (live events); the
    // browser (the slow part to start), then two gateways on the same configuration, accepting
    // the page's origin.
    let fleet = Fleet::new("gwb");
    let mut projector = fleet.worker("p1").start("projector").await;
    let mut notifier = fleet.worker("n1").start("notifier").await;
    let browser = Browser::start(&chromium, &chromedriver).await;
    let site = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", site.local_addr().unwrap());
    let mut a = gateway(&fleet, "gw-a", &origin).start("gateway").await;
    let mut b = gateway(&fleet, "gw-b", &origin).start("gateway").await;

    // The Service in front of them (another origin than the page's), and the page.
    let proxy = Proxy::start(&a.http).await;
    let topics: Vec<String> = FLOWS.iter().map(|&n| fleet.flow(n)).collect();
    let granted: Vec<&str> = topics.iter().map(String::as_str).collect();
    let token = token(&granted, 300);
    let page = page(&format!("http://{}", proxy.addr), &topics, &token);
    let _site = tokio::spawn(serve_page(site, page));
    browser.client.goto(&format!("{origin}/")).await.unwrap();
    // Live events reach a stream only once it is open (subscribed): wait for every `open`.
    let state = browser
        .until("every EventSource open", &[&a], |s| {
            topics
                .iter()
                .all(|t| s["sources"][t]["opens"].as_u64() >= Some(1))
        })
        .await;
    assert_eq!(state["received"], json!([]), "nothing before any publish");

    // Live, through A.
    fleet.publish(&events(&fleet, 0..10)).await;
    let before_kill = browser
        .until("the first 10 events of each flow", &[&a], |s| rows(s) >= 20)
        .await;
    assert_eq!(rows(&before_kill), 20, "{before_kill:#}");
    let last_ids: Vec<String> = topics
        .iter()
        .map(|t| {
            let mine = of_topic(&before_kill, t);
            mine.last().unwrap()["id"].as_str().unwrap().to_owned()
        })
        .collect();

    // A dies; new connections wait in the Service until B is its endpoint, so the page stays
    // disconnected while more events are published.
    proxy.hold();
    a.signal("KILL").await;
    a.wait(WAIT).await;
    let errors = |s: &Value, t: &str| s["sources"][t]["errors"].as_u64().unwrap_or(0);
    browser
        .until("every EventSource saw the connection drop", &[], |s| {
            topics
                .iter()
                .all(|t| errors(s, t) > errors(&before_kill, t))
        })
        .await;
    fleet.publish(&events(&fleet, 10..40)).await;
    let conn = redis().await;
    for n in FLOWS {
        history_holds(&conn, &fleet.history_key(n), 40, WAIT).await;
    }
    // The browser is reconnecting by itself: both streams' requests are waiting in the Service.
    wait_until(WAIT, "both EventSources reconnecting", || {
        let waiting = proxy.waiting();
        let all = topics
            .iter()
            .all(|t| waiting.iter().any(|head| head.contains(t.as_str())));
        async move { all }
    })
    .await;
    assert_eq!(
        rows(&browser.state().await),
        20,
        "nothing while disconnected"
    );

    // B becomes the endpoint: the browser's reconnects resume there.
    proxy.route_to(&b.http);
    browser
        .until("the 30 missed events of each flow, from B", &[&b], |s| {
            rows(s) >= 80
        })
        .await;
    // And then live, through B.
    fleet.publish(&events(&fleet, 40..50)).await;
    let state = browser
        .until("all 50 events of each flow", &[&b], |s| rows(s) >= 100)
        .await;
    // Nothing more comes (no late duplicate).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state_after = browser.state().await;
    assert_eq!(rows(&state_after), rows(&state), "{state_after:#}");

    // Every event once, in order per flow, with its id, its channel and no reset.
    for (t, topic) in topics.iter().enumerate() {
        let mine = of_topic(&state_after, topic);
        let numbers: Vec<u64> = mine.iter().map(|r| r["i"].as_u64().unwrap()).collect();
        assert_eq!(
            numbers,
            (0..50).collect::<Vec<_>>(),
            "{topic}: {state_after:#}"
        );
        for r in &mine {
            assert_eq!(r["type"], "flow.progress", "{r}");
            assert_eq!(r["channel"], topic.as_str(), "{r}");
            assert_eq!(
                r["id"].as_str().unwrap(),
                format!("{}@{}", r["entry_id"].as_str().unwrap(), fleet.stream),
                "lastEventId is <entry id>@<stream>"
            );
        }
        let ids: Vec<(u64, u64)> = mine
            .iter()
            .map(|r| entry_id_key(r["entry_id"].as_str().unwrap()))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{topic}: {ids:?}");
        // The browser sent, by itself, the last id it had seen before A died, to B.
        let asked = format!("last-event-id: {}", last_ids[t]).to_ascii_lowercase();
        assert!(
            proxy
                .requests_to(&b.http)
                .iter()
                .any(|r| r.to_ascii_lowercase().contains(&asked)),
            "{topic}: no request to B with `{asked}`: {:#?}",
            proxy.requests_to(&b.http)
        );
        // The same EventSource throughout: opened on A, then once on B, open (1) now.
        let source = &state_after["sources"][topic];
        assert_eq!(source["opens"].as_u64(), Some(2), "{topic}: {source}");
        assert_eq!(source["readyState"], 1, "{topic}: {source}");
    }
    assert_eq!(
        state_after["dom"].as_u64(),
        Some(100),
        "one line per event on the page"
    );
    // Each EventSource's reconnect was a resume on B, not a reset.
    let resumes = b.metric("fleet_gateway_resumes_total", "").await;
    assert_eq!(resumes, 2.0, "resumes on B:\n{}", b.log_text());
    assert_eq!(b.metric("fleet_gateway_resets_total", "").await, 0.0);
    // The 30 missed events of each stream came from the history (live events that closely
    // follow a resume may come from it too).
    let from_history = b
        .metric("fleet_gateway_messages_sent_total", "origin=\"history\"")
        .await;
    assert!(from_history >= 60.0, "{from_history} from the history");

    browser.close().await;
    b.stop_cleanly().await;
    notifier.stop_cleanly().await;
    projector.stop_cleanly().await;
}

/// The path of `name` on `PATH`; a failure saying how to install it when it is not there.
fn installed(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed: this test drives a real headless Chromium. Install Debian's \
             packages with `DEBIAN_FRONTEND=noninteractive apt-get update && apt-get install -y \
             chromium chromium-driver` (as root), or run scripts/services, which installs them"
        )
    })
}

/// Events `range` of every flow, interleaved (`data.i` numbers them within a flow).
fn events(fleet: &Fleet, range: std::ops::Range<usize>) -> Vec<String> {
    range
        .flat_map(|i| FLOWS.map(|n| fleet.event(n, i)))
        .collect()
}

/// A gateway of the fleet, named `instance`, serving pages of `origin`.
fn gateway(fleet: &Fleet, instance: &str, origin: &str) -> WorkerEnv {
    fleet
        .gateway()
        .set("FLEET_GATEWAY_CORS_ORIGINS", origin)
        .set("FLEET_GATEWAY_INSTANCE", instance)
}

/// The page: one `EventSource` per topic on the gateway's URL (another origin), each message
/// appended to `window.received` and to the list on the page. Reconnecting is the browser's own
/// business: the page has no code for it.
fn page(gateway: &str, topics: &[String], token: &str) -> String {
    let settings = json!({"gateway": gateway, "topics": topics, "token": token});
    format!(
        r#"<!doctype html>
<html>
<head><meta charset="utf-8"><title>streamfleet: live flows</title></head>
<body>
<h1>Flows</h1>
<ol id="log"></ol>
<script>
const settings = {settings};
window.received = [];
window.sources = {{}};
for (const topic of settings.topics) {{
  const url = settings.gateway + "/events?topic=" + encodeURIComponent(topic)
    + "&access_token=" + encodeURIComponent(settings.token);
  const events = new EventSource(url);
  const source = {{ events, opens: 0, errors: 0 }};
  window.sources[topic] = source;
  events.addEventListener("open", () => {{ source.opens += 1; }});
  events.addEventListener("error", () => {{ source.errors += 1; }});
  for (const type of ["flow.progress", "reset"]) {{
    events.addEventListener(type, (e) => {{
      const data = JSON.parse(e.data);
      const row = {{
        topic, type, id: e.lastEventId, channel: data.channel ?? null,
        entry_id: data.entry_id ?? null, i: data.data ? data.data.i : null,
      }};
      window.received.push(row);
      const line = document.createElement("li");
      line.textContent = row.id + " " + row.channel + " i=" + row.i;
      document.getElementById("log").appendChild(line);
    }});
  }}
}}
</script>
</body>
</html>
"#
    )
}

/// Serves `page` at every path but `/favicon.ico` (404), one request per connection.
async fn serve_page(listener: TcpListener, page: String) {
    let page = Arc::new(page);
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            let path = head.split(' ').nth(1).unwrap_or("/");
            let response = if path == "/favicon.ico" {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Cache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                )
            };
            let _ = s.write_all(response.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// The bytes of a request head (up to its blank line), as text; `None` if the peer closed first.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// One connection through the proxy: the backend it went to (`None` while it waits for one) and
/// what the browser sent on it (its first 16 KiB).
#[derive(Debug, Clone)]
struct Passage {
    backend: Option<String>,
    sent: String,
}

/// A TCP proxy on one port, as a Kubernetes Service: each new connection goes to the current
/// endpoint, or waits for one while there is none; a connection whose backend dies is closed.
struct Proxy {
    addr: std::net::SocketAddr,
    endpoint: watch::Sender<Option<String>>,
    passages: Arc<Mutex<Vec<Passage>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(backend: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (endpoint, rx) = watch::channel(Some(backend.to_owned()));
        let passages: Arc<Mutex<Vec<Passage>>> = Arc::default();
        let log = passages.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(pass(client, rx.clone(), log.clone()));
            }
        });
        Proxy {
            addr,
            endpoint,
            passages,
            accept,
        }
    }

    /// No endpoint: new connections wait.
    fn hold(&self) {
        self.endpoint.send_replace(None);
    }

    fn route_to(&self, backend: &str) {
        self.endpoint.send_replace(Some(backend.to_owned()));
    }

    /// The first requests of the connections waiting for an endpoint.
    fn waiting(&self) -> Vec<String> {
        let passages = self.passages.lock().unwrap();
        passages
            .iter()
            .filter(|p| p.backend.is_none())
            .map(|p| p.sent.clone())
            .collect()
    }

    /// What the browser sent on each connection that went to `backend`.
    fn requests_to(&self, backend: &str) -> Vec<String> {
        let passages = self.passages.lock().unwrap();
        passages
            .iter()
            .filter(|p| p.backend.as_deref() == Some(backend))
            .map(|p| p.sent.clone())
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Carries one browser connection: reads its first request head, waits for an endpoint, then
/// copies both ways until either side closes, and closes both.
async fn pass(
    mut client: TcpStream,
    mut endpoint: watch::Receiver<Option<String>>,
    log: Arc<Mutex<Vec<Passage>>>,
) {
    let Some(head) = read_head(&mut client).await else {
        return;
    };
    let index = {
        let mut log = log.lock().unwrap();
        log.push(Passage {
            backend: None,
            sent: head.clone(),
        });
        log.len() - 1
    };
    let Ok(backend) = endpoint.wait_for(Option::is_some).await.map(|b| b.clone()) else {
        return;
    };
    let backend = backend.unwrap();
    let Ok(mut upstream) = TcpStream::connect(&backend).await else {
        return;
    };
    log.lock().unwrap()[index].backend = Some(backend);
    if upstream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let (mut from_client, mut to_client) = client.split();
    let (mut from_upstream, mut to_upstream) = upstream.split();
    let up = async {
        let mut buf = [0u8; 8192];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    {
                        let mut log = log.lock().unwrap();
                        let sent = &mut log[index].sent;
                        if sent.len() < 16 * 1024 {
                            sent.push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                    if to_upstream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = tokio::io::copy(&mut from_upstream, &mut to_client);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    // Both sockets close here: a backend that died ends the browser's response mid-stream.
}

/// Headless Chromium through a chromedriver of the test's own.
struct Browser {
    client: fantoccini::Client,
    /// Declared after `client`: dropped (killed) after it.
    _driver: Driver,
}

/// The chromedriver process and the browser processes it started (found by their profile
/// folder, which is the test's own), killed when the test ends however it ends.
struct Driver {
    child: Child,
    profile: PathBuf,
    log: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        kill_processes_using(&self.profile);
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Kills (SIGKILL) the processes whose command line names `profile`: the Chromium processes
/// of this test's session, nothing else.
fn kill_processes_using(profile: &Path) {
    let needle = profile.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let port = free_addr().rsplit(':').next().unwrap().to_owned();
        let addr = format!("127.0.0.1:{port}");
        let profile = std::env::temp_dir().join(unique("chromium-profile-"));
        let log = std::env::temp_dir().join(format!("{}.log", unique("chromedriver-")));
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display()));
        let mut driver = Driver {
            child,
            profile,
            log,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = driver.child.try_wait().unwrap() {
                panic!("chromedriver exited with {status}:\n{}", driver.log_text());
            }
            if driver_ready(&addr).await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver never answered on {addr}:\n{}",
                driver.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut capabilities = Capabilities::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    format!("--user-data-dir={}", driver.profile.display()),
                ],
            }),
        );
        let mut builder = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        );
        builder.capabilities(capabilities);
        let url = format!("http://{addr}");
        let connect = builder.connect(&url);
        let client = match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!(
                "chromedriver could not start Chromium: {e}\n{}",
                driver.log_text()
            ),
            Err(_) => panic!("Chromium did not start within 60 s:\n{}", driver.log_text()),
        };
        Browser {
            client,
            _driver: driver,
        }
    }

    /// What the page received, the state of its `EventSource`s and the lines it shows.
    async fn state(&self) -> Value {
        self.client
            .execute(
                r##"
const sources = {};
for (const [topic, s] of Object.entries(window.sources || {})) {
  sources[topic] = { opens: s.opens, errors: s.errors, readyState: s.events.readyState };
}
return {
  received: window.received || [],
  sources,
  dom: document.querySelectorAll("#log li").length,
};
"##,
                vec![],
            )
            .await
            .expect("read the page's state")
    }

    /// Polls the page until `done` holds of its state; returns that state. On a timeout, the
    /// failure shows the page's state and the logs of `gateways`.
    async fn until(
        &self,
        what: &str,
        gateways: &[&Worker],
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.state().await;
            if done(&state) {
                return state;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = gateways.iter().map(|g| g.log_text()).collect();
                panic!(
                    "timed out waiting for {what}; the page has:\n{state:#}\ngateway logs:\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn close(self) {
        let Browser { client, _driver } = self;
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
    }
}

/// Whether chromedriver's `/status` says it is ready (it keeps the connection open: the answer
/// is read until it says so, for at most 2 s).
async fn driver_ready(addr: &str) -> bool {
    let check = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /status HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer).replace(' ', "");
            if text.contains("\"ready\":true") {
                return Some(());
            }
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(()))
    )
}

impl Driver {
    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Rows the page received.
fn rows(state: &Value) -> usize {
    state["received"].as_array().map_or(0, Vec::len)
}

/// The rows of one topic's `EventSource`, in the order the page got them.
fn of_topic(state: &Value, topic: &str) -> Vec<Value> {
    state["received"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["topic"] == topic)
        .cloned()
        .collect()
}
