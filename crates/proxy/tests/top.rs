//! `toolwarden top` in a pseudo-terminal: the built binary reads a running
//! proxy's metrics address (the proxy in front of server-everything, with
//! traffic), draws the per-tool table, quits on `q` with status 0 and
//! gives the terminal back as it found it; against an address nothing
//! listens on, it says so and keeps trying.

#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::pty::openpty;
use nix::sys::termios::{tcgetattr, LocalFlags};
use serde_json::json;
use support::{component, eventually, free_port, Proxy, LIMIT};

/// `toolwarden <args>` on a new pseudo-terminal: the child, the master
/// side to type into, what it printed so far, and a handle on the slave
/// side to read the terminal's settings with.
struct Terminal {
    child: Child,
    master: std::fs::File,
    screen: Arc<Mutex<Vec<u8>>>,
    slave: OwnedFd,
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Terminal {
    fn start(args: &[&str]) -> Terminal {
        let pty = openpty(None, None).expect("a pseudo-terminal");
        let child = Command::new(env!("CARGO_BIN_EXE_toolwarden"))
            .args(args)
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave.try_clone().unwrap()))
            .spawn()
            .expect("the toolwarden binary starts");
        let master = std::fs::File::from(pty.master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with an error (EIO) once every slave handle is closed.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            master,
            screen,
            slave: pty.slave,
        }
    }

    /// Everything printed so far, raw.
    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// The text of the last frame drawn: after the last cursor-home, with
    /// the escape sequences removed.
    fn last_frame(&self) -> String {
        let raw = self.raw();
        let frame = raw.rsplit("\x1b[H").next().unwrap_or("");
        strip_ansi(frame)
    }

    fn echo_on(&self) -> bool {
        let settings = tcgetattr(&self.slave).unwrap();
        settings.local_flags.contains(LocalFlags::ECHO)
            && settings.local_flags.contains(LocalFlags::ICANON)
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
        self.master.flush().unwrap();
    }

    /// Waits (bounded) for the exit status.
    async fn exit_status(&mut self) -> std::process::ExitStatus {
        eventually(LIMIT, || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
        .expect("toolwarden top exits after q")
    }
}

/// The text without ANSI escape sequences (`ESC [ ... letter`, `ESC [ ? ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// The cells of the table row of `tool` in `frame`, if drawn.
fn row(frame: &str, tool: &str) -> Option<Vec<String>> {
    frame
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(tool))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_draws_the_live_table_and_quits_on_q_restoring_the_terminal() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let mut proxy = Proxy::start(
        &[
            "run",
            "--metrics-addr",
            &metrics_addr,
            "--",
            bin.to_str().unwrap(),
            "stdio",
        ],
        &[],
    );
    proxy.initialize().await;
    proxy.request(1, "tools/list", json!({})).await;
    for id in 2..5 {
        let echoed = proxy.call(id, "echo", json!({"message": "hi"})).await;
        assert_eq!(
            echoed["result"]["content"][0]["text"], "Echo: hi",
            "{echoed}"
        );
    }
    proxy.call(5, "get-sum", json!({"a": 1, "b": 2})).await;

    let mut top = Terminal::start(&[
        "top",
        "--metrics-addr",
        &metrics_addr,
        "--interval",
        "200ms",
    ]);
    let drawn = eventually(LIMIT, || {
        let frame = top.last_frame();
        async move {
            let echo = row(&frame, "echo")?;
            let sum = row(&frame, "get-sum")?;
            // tool, calls, active, ok, failed, refused, ...
            (echo[1] == "3" && echo[3] == "3" && sum[1] == "1").then_some(frame)
        }
    })
    .await;
    let Some(frame) = drawn else {
        panic!(
            "the table never showed echo's 3 calls:\n{}",
            top.last_frame()
        );
    };
    assert!(frame.contains("toolwarden top"), "{frame}");
    assert!(
        frame.contains("calls") && frame.contains("breaker"),
        "{frame}"
    );
    assert_eq!(row(&frame, "echo").unwrap()[9], "closed", "{frame}");
    // The terminal is in key-at-a-time mode while it runs.
    assert!(!top.echo_on(), "echo still on while top runs");
    // Live: a new call shows on a later frame.
    proxy.call(6, "echo", json!({"message": "again"})).await;
    let updated = eventually(LIMIT, || {
        let frame = top.last_frame();
        async move { (row(&frame, "echo")?[1] == "4").then_some(()) }
    })
    .await;
    assert!(
        updated.is_some(),
        "no redraw with the 4th call:\n{}",
        top.last_frame()
    );

    top.type_keys(b"q");
    let status = top.exit_status().await;
    assert!(status.success(), "{status:?}");
    // The terminal is given back: settings restored, main screen, cursor shown.
    assert!(top.echo_on(), "echo and line mode not restored");
    let raw = top.raw();
    let left = raw
        .rfind("\x1b[?1049l")
        .expect("the alternate screen is left");
    assert!(raw.rfind("\x1b[?1049h").unwrap() < left);
    assert!(
        !raw[left..].contains("\x1b[H"),
        "nothing drawn after leaving"
    );
    assert!(raw.contains("\x1b[?25h"), "the cursor is shown again");

    let status = proxy.close_and_wait().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_address_is_reported_and_retried_until_q() {
    let port = free_port(); // nothing listens there
    let addr = format!("127.0.0.1:{port}");
    let mut top = Terminal::start(&["top", "--metrics-addr", &addr, "--interval", "100ms"]);
    let shown =
        eventually(LIMIT, || {
            let frame = top.last_frame();
            async move {
                (frame.contains("cannot reach") && frame.contains("retrying")).then_some(frame)
            }
        })
        .await;
    let Some(frame) = shown else {
        panic!("no error on screen:\n{}", top.last_frame());
    };
    assert!(frame.contains(&format!("http://{addr}/")), "{frame}");
    top.type_keys(b"q");
    let status = top.exit_status().await;
    assert!(status.success(), "{status:?}");
    assert!(top.echo_on());
}

#[test]
fn once_prints_the_table_or_fails_when_unreachable() {
    let addr = format!("127.0.0.1:{}", free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .args(["top", "--once", "--metrics-addr", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach") && err.contains(&addr), "{err}");
    // Bad arguments are refused before anything is read.
    let out = Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .args(["top", "--metrics-addr", &addr, "--interval", "1ms"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 100ms"));
}
