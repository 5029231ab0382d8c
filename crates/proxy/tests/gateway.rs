//! The gateway end to end: three real upstreams behind one `toolwarden`
//! process — server-everything over stdio, mcp-server-time over stdio, and
//! the flaky test server over Streamable HTTP — with namespaced lists,
//! filtering, per-upstream health, and one upstream killed and restarted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{component, eventually, free_port, health, http_get, kill, Proxy, LIMIT};

fn names(list: &Value, key: &str) -> Vec<String> {
    list["result"][key]
        .as_array()
        .unwrap_or_else(|| panic!("not a {key} list: {list}"))
        .iter()
        .map(|item| item["name"].as_str().unwrap().to_owned())
        .collect()
}

fn text(result: &Value) -> String {
    result["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A request's answer, and how many `tools/list_changed` came before it.
async fn exchange(proxy: &mut Proxy, id: i64, method: &str, params: Value) -> (Value, usize) {
    proxy
        .send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
        .await;
    let (answer, notifications) = proxy.response(&json!(id)).await;
    let changed = notifications
        .iter()
        .filter(|n| n["method"] == "notifications/tools/list_changed")
        .count();
    (answer, changed)
}

/// `tools/list`'s names, and how many `tools/list_changed` came before it.
async fn list_tools(proxy: &mut Proxy, id: &mut i64) -> (Vec<String>, usize) {
    *id += 1;
    let (list, changed) = exchange(proxy, *id, "tools/list", json!({})).await;
    (names(&list, "tools"), changed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_upstreams_behind_one_gateway() {
    let (Some(everything), Some(time), Some(python)) = (
        component("TOOLWARDEN_SERVER_EVERYTHING"),
        component("TOOLWARDEN_MCP_SERVER_TIME"),
        component("TOOLWARDEN_PYTHON"),
    ) else {
        return;
    };
    let flaky = support::FlakyHttp::start(&python, &[]).await;
    let config = support::write_temp(
        "gateway",
        "gateway.toml",
        &format!(
            r#"
[limits]
reject_unknown_tools = true

[upstreams.everything]
command = {everything:?}
args = ["stdio"]
aliases = {{ say = "echo" }}

[upstreams.time]
command = {time:?}
args = ["--local-timezone", "UTC"]
restart_backoff_min = "2s"
restart_backoff_max = "2s"
circuit_breaker = {{ failure_threshold = 1, reset_timeout = "2s" }}

[upstreams.flaky]
url = "http://127.0.0.1:{port}/mcp"
deny = ["flaky_*"]
"#,
            port = flaky.port
        ),
    );
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let mut proxy = Proxy::start(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--metrics-addr",
            &metrics_addr,
        ],
        &[],
    );
    let info = proxy.initialize().await;
    assert_eq!(info["serverInfo"]["name"], "toolwarden-gateway", "{info}");
    assert_eq!(info["capabilities"]["tools"]["listChanged"], true, "{info}");

    // Namespaced tools/list: every upstream's tools behind its name, the
    // alias in place of the tool, the denied tool absent.
    let list = proxy.request(1, "tools/list", json!({})).await;
    let tools = names(&list, "tools");
    for expected in [
        "everything__say",
        "everything__get-sum",
        "time__get_current_time",
        "time__convert_time",
        "flaky__slow",
        "flaky__stats",
    ] {
        assert!(
            tools.contains(&expected.to_owned()),
            "{expected} missing from {tools:?}"
        );
    }
    for absent in [
        "everything__echo",
        "flaky__flaky_search",
        "echo",
        "get_current_time",
    ] {
        assert!(
            !tools.contains(&absent.to_owned()),
            "{absent} listed: {tools:?}"
        );
    }
    assert!(
        tools.iter().all(|t| ["everything__", "time__", "flaky__"]
            .iter()
            .any(|p| t.starts_with(p))),
        "{tools:?}"
    );

    // Calls reach the upstream their name says, under the server's name.
    let echoed = proxy
        .call(2, "everything__say", json!({"message": "hi"}))
        .await;
    assert!(text(&echoed).contains("hi"), "{echoed}");
    let now = proxy
        .call(3, "time__get_current_time", json!({"timezone": "UTC"}))
        .await;
    assert_eq!(now["result"]["isError"], false, "{now}");
    assert!(text(&now).contains("UTC"), "{now}");

    // A denied tool is refused and never reaches its server.
    let denied = proxy
        .call(4, "flaky__flaky_search", json!({"query": "x"}))
        .await;
    assert_eq!(denied["error"]["code"], -32602, "{denied}");
    let stats = proxy.call(5, "flaky__stats", json!({})).await;
    assert_eq!(
        stats["result"]["structuredContent"]["flaky_search"], 0,
        "the denied tool reached the server: {stats}"
    );

    // Prompts and resources are namespaced the same way.
    let prompts = proxy.request(6, "prompts/list", json!({})).await;
    let prompt_names = names(&prompts, "prompts");
    assert!(!prompt_names.is_empty(), "{prompts}");
    assert!(
        prompt_names.iter().all(|p| p.starts_with("everything__")),
        "{prompt_names:?}"
    );
    let simple = prompt_names
        .iter()
        .find(|p| p.contains("simple"))
        .unwrap_or_else(|| panic!("no simple prompt in {prompt_names:?}"));
    let prompt = proxy
        .request(7, "prompts/get", json!({"name": simple}))
        .await;
    assert!(prompt["result"]["messages"].is_array(), "{prompt}");
    let resources = proxy.request(8, "resources/list", json!({})).await;
    let first = &resources["result"]["resources"][0];
    assert!(
        first["name"].as_str().unwrap().starts_with("everything__"),
        "{resources}"
    );
    let read = proxy
        .request(9, "resources/read", json!({"uri": first["uri"]}))
        .await;
    assert!(read["result"]["contents"].is_array(), "{read}");

    // /health and /circuits report each upstream.
    let (_, report) = eventually(LIMIT, || health(metrics)).await.unwrap();
    let upstreams = &report["upstream"]["upstreams"];
    assert_eq!(report["upstream"]["mode"], "gateway", "{report}");
    for name in ["everything", "time", "flaky"] {
        assert_eq!(upstreams[name]["state"], "up", "{report}");
        assert_eq!(upstreams[name]["circuit"], "closed", "{report}");
    }
    let (_, circuits) = http_get(metrics, "/circuits").await.unwrap();
    let circuits: Value = serde_json::from_str(&circuits).unwrap();
    assert!(circuits["upstreams"]["time"].is_object(), "{circuits}");

    // Kill the time server (once the clients were told it is there): only
    // its tools are affected.
    let announced = eventually(LIMIT, || async move {
        let (_, report) = health(metrics).await?;
        (report["upstream"]["upstreams"]["time"]["announced"] == true).then_some(())
    })
    .await;
    assert!(
        announced.is_some(),
        "the time upstream was never announced available"
    );
    let pid = upstreams["time"]["pid"].as_u64().unwrap() as u32;
    kill(pid, "KILL");
    let call = json!({"name": "time__get_current_time", "arguments": {"timezone": "UTC"}});
    let (_, mut told) = exchange(&mut proxy, 10, "tools/call", call).await;
    let mut id = 100;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let hidden = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead upstream's tools were never hidden from tools/list"
        );
        let (tools, changed) = list_tools(&mut proxy, &mut id).await;
        told += changed;
        if !tools.iter().any(|t| t.starts_with("time__")) {
            break tools;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(hidden.contains(&"everything__say".to_owned()), "{hidden:?}");
    assert!(hidden.contains(&"flaky__slow".to_owned()), "{hidden:?}");
    let call = json!({"name": "everything__say", "arguments": {"message": "still"}});
    let (echoed, changed) = exchange(&mut proxy, 11, "tools/call", call).await;
    told += changed;
    assert!(text(&echoed).contains("still"), "{echoed}");

    // It comes back after the restart, and the clients are told both times.
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted upstream's tools never came back"
        );
        let (tools, changed) = list_tools(&mut proxy, &mut id).await;
        told += changed;
        if tools.contains(&"time__get_current_time".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The watcher notices a change within its interval: the notification
    // may come after a list that already shows the change.
    while told < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        told += list_tools(&mut proxy, &mut id).await.1;
    }
    assert!(
        told >= 2,
        "notifications/tools/list_changed sent when hidden and when back: {told}"
    );
    let now = proxy
        .call(12, "time__get_current_time", json!({"timezone": "UTC"}))
        .await;
    assert_eq!(now["result"]["isError"], false, "{now}");
    let (_, report) = health(metrics).await.unwrap();
    assert!(
        report["upstream"]["upstreams"]["time"]["restarts"].as_u64() >= Some(1),
        "{report}"
    );
    assert_eq!(
        report["upstream"]["upstreams"]["everything"]["restarts"], 0,
        "{report}"
    );

    // Every request is counted by its method, those the gateway answers
    // itself too (regression: ping, the lists and initialize were not, and
    // the lists of prompts and resources were one `prompts`/`resources`).
    let requests = |text: &str, method: &str| -> u64 {
        let series = format!("toolwarden_proxy_requests_total{{method=\"{method}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let (_, before) = http_get(metrics, "/metrics").await.unwrap();
    let pong = proxy.request(40, "ping", json!({})).await;
    assert!(pong.get("result").is_some(), "{pong}");
    let prompts = proxy.request(41, "prompts/list", json!({})).await;
    assert!(prompts.get("result").is_some(), "{prompts}");
    let (_, after) = http_get(metrics, "/metrics").await.unwrap();
    assert_eq!(requests(&after, "initialize"), 1, "{after}");
    for method in ["ping", "prompts/list"] {
        assert_eq!(
            requests(&after, method),
            requests(&before, method) + 1,
            "{method}: {after}"
        );
    }
    assert!(requests(&after, "tools/list") >= 1, "{after}");
    assert!(requests(&after, "tools/call") >= 1, "{after}");
    drop(flaky);
}
