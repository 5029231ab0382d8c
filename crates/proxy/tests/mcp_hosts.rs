//! `docs/mcp-hosts.md` and its snippets (`docs/hosts/`): the page shows
//! each file as it is, and every snippet works. Each host's stdio entry is
//! run as the host would run it (its `command`, `args` and `env`, with the
//! built `toolwarden` for `toolwarden` and server-everything's installed
//! binary for `npx -y @modelcontextprotocol/server-everything`), then
//! spoken to over stdio: initialize, tools/list, tools/call. The HTTP
//! variant's command line is run, and each HTTP host entry's URL and
//! headers (the token substituted) are used by an MCP client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rmcp::model::{CallToolRequestParams, CallToolResponse};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt as _;
use serde_json::{json, Value};
use support::{component, eventually, free_port, http_post, wait_listening, Proxy, LIMIT};

fn docs() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn snippet(name: &str) -> Value {
    let path = docs().join("hosts").join(name);
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"))
}

/// How the snippets start server-everything, and what the tests run instead.
const NPX_EVERYTHING: [&str; 3] = ["npx", "-y", "@modelcontextprotocol/server-everything"];

/// A snippet's argument list with server-everything's `npx` command
/// replaced by `server` (what the test environment has installed).
fn substitute_server(args: &[String], server: &Path) -> Vec<String> {
    let split = args
        .iter()
        .position(|a| a == "--")
        .expect("the server's command comes after --");
    let (ours, theirs) = args.split_at(split + 1);
    assert!(
        theirs.starts_with(&NPX_EVERYTHING.map(str::to_owned)),
        "the snippet wraps server-everything through npx: {theirs:?}"
    );
    let mut out = ours.to_vec();
    out.push(server.to_str().unwrap().to_owned());
    out.extend(theirs[NPX_EVERYTHING.len()..].iter().cloned());
    out
}

#[test]
fn the_page_shows_every_snippet_as_it_is_in_its_file() {
    let page = read(&docs().join("mcp-hosts.md"));
    let mut included = Vec::new();
    let mut rest = page.as_str();
    while let Some(start) = rest.find("<!-- include: ") {
        let after = &rest[start + "<!-- include: ".len()..];
        let (name, body) = after.split_once(" -->\n").expect("an include marker ends");
        let (block, next) = body
            .split_once("<!-- end include -->")
            .expect("an include is closed");
        let fence_end = block.find('\n').expect("a fenced block") + 1;
        let code = block[fence_end..]
            .strip_suffix("```\n")
            .unwrap_or_else(|| panic!("{name}: the fenced block ends right before the end marker"));
        assert_eq!(
            code,
            read(&docs().join(name)),
            "{name} differs from the page"
        );
        included.push(name.to_owned());
        rest = next;
    }
    let mut files: Vec<String> = std::fs::read_dir(docs().join("hosts"))
        .unwrap()
        .map(|e| format!("hosts/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    files.sort();
    included.sort();
    assert_eq!(included, files, "every snippet file is on the page, once");
    // The install commands are the real ones.
    assert!(page.contains("cargo install --locked --path crates/proxy"));
    let manifest = read(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/Cargo.toml"
    )));
    assert!(
        manifest.contains("name = \"toolwarden-proxy\"")
            && manifest.contains("name = \"toolwarden\"")
    );
    assert!(page.contains("cargo install --locked toolwarden-proxy"));
}

#[test]
fn each_host_uses_its_own_shape() {
    for (file, key) in [
        ("claude-desktop.json", "mcpServers"),
        ("cursor.json", "mcpServers"),
        ("cursor-http.json", "mcpServers"),
        ("vscode.json", "servers"),
        ("vscode-http.json", "servers"),
    ] {
        let servers = snippet(file)[key].as_object().cloned();
        let servers = servers.unwrap_or_else(|| panic!("{file}: no {key} object"));
        assert!(!servers.is_empty(), "{file}");
    }
    assert_eq!(
        snippet("vscode.json")["servers"]["everything"]["type"],
        "stdio"
    );
    assert_eq!(
        snippet("vscode-http.json")["servers"]["everything"]["type"],
        "http"
    );
    // VS Code's token comes from the input the file declares.
    let vscode = snippet("vscode-http.json");
    let id = vscode["inputs"][0]["id"].as_str().unwrap();
    let auth = vscode["servers"]["everything"]["headers"]["Authorization"]
        .as_str()
        .unwrap();
    assert_eq!(auth, format!("Bearer ${{input:{id}}}"));
    assert_eq!(vscode["inputs"][0]["password"], true);
}

/// The stdio entries: run each as its host would, then speak MCP to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stdio_snippet_runs_and_answers_tool_calls() {
    let Some(server) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    for (file, key) in [
        ("claude-desktop.json", "mcpServers"),
        ("cursor.json", "mcpServers"),
        ("vscode.json", "servers"),
    ] {
        let entry = &snippet(file)[key]["everything"];
        assert_eq!(entry["command"], "toolwarden", "{file}");
        let args: Vec<String> = entry["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        let args = substitute_server(&args, &server);
        let env: Vec<(String, String)> = entry["env"]
            .as_object()
            .map(|env| {
                env.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut proxy = Proxy::start(&args, &env);

        let init = proxy.initialize().await;
        assert_eq!(
            init["serverInfo"]["name"], "mcp-servers/everything",
            "{file}: {init}"
        );
        let listed = proxy.request(1, "tools/list", json!({})).await;
        let names: Vec<&str> = listed["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: {listed}"))
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert!(
            names.contains(&"echo") && names.contains(&"get-sum"),
            "{file}: {names:?}"
        );
        let echoed = proxy.call(2, "echo", json!({"message": file})).await;
        assert_eq!(
            echoed["result"]["content"][0]["text"],
            format!("Echo: {file}"),
            "{file}: {echoed}"
        );
        let sum = proxy.call(3, "get-sum", json!({"a": 2, "b": 40})).await;
        let text = sum["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        assert!(text.contains("42"), "{file}: {sum}");
        let status = proxy.close_and_wait().await;
        assert!(status.success(), "{file}: {status:?}");
    }
}

/// The HTTP variant: the proxy started with `http-proxy.sh`'s command line
/// (port and token file substituted), then each HTTP host entry's URL and
/// headers used by an MCP client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_snippets_serve_tool_calls_with_the_token() {
    let Some(server) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let line = read(&docs().join("hosts/http-proxy.sh"));
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    assert_eq!(words[0], "toolwarden", "{line}");
    let token = format!("tw-{}-{}", std::process::id(), free_port());
    let tokens = support::write_temp("mcp-hosts", "tokens", &format!("{token}\n"));
    let port = free_port();
    let documented = "127.0.0.1:8931";
    let mut args = substitute_server(&words[1..], &server);
    for arg in &mut args {
        if arg == documented {
            *arg = format!("127.0.0.1:{port}");
        } else if arg == "127.0.0.1:9464" {
            *arg = format!("127.0.0.1:{}", free_port());
        } else if arg.starts_with("~/") {
            assert_eq!(arg, "~/.config/toolwarden/tokens");
            *arg = tokens.to_str().unwrap().to_owned();
        }
    }
    assert!(args.iter().any(|a| a == "--listen"), "{args:?}");
    assert!(args.iter().any(|a| a == "--auth-token-file"), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _proxy = Proxy::start(&args, &[]);
    wait_listening(port, "the proxy's --listen").await;

    for (file, key, variable) in [
        ("cursor-http.json", "mcpServers", "${env:TOOLWARDEN_TOKEN}"),
        ("vscode-http.json", "servers", "${input:toolwarden-token}"),
    ] {
        let entry = &snippet(file)[key]["everything"];
        let url = entry["url"]
            .as_str()
            .unwrap()
            .replace(documented, &format!("127.0.0.1:{port}"));
        assert!(url.ends_with("/mcp"), "{file}: {url}");
        let headers: HashMap<String, String> = entry["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().replace(variable, &token)))
            .collect();
        let bearer = headers["Authorization"]
            .strip_prefix("Bearer ")
            .unwrap_or_else(|| panic!("{file}: a bearer token"))
            .to_owned();
        assert_eq!(bearer, token, "{file}: the variable is the whole token");

        // Without the token: refused.
        let path = url.split_once(&format!("{port}")).unwrap().1;
        let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "no-token", "version": "0"}}});
        let (status, _) = http_post(port, path, &initialize.to_string())
            .await
            .unwrap();
        assert_eq!(status, 401, "{file}: a client without the token");

        // With it: an MCP client gets real answers.
        let config = StreamableHttpClientTransportConfig::with_uri(url.clone()).auth_header(bearer);
        let client = eventually(LIMIT, || {
            let config = config.clone();
            async move { ().serve(StreamableHttpClientTransport::from_config(config)).await.ok() }
        })
        .await
        .unwrap_or_else(|| panic!("{file}: the client could not connect to {url}"));
        let info = client.peer_info().expect("the server's info");
        let name = info.server_info.as_ref().map(|i| i.name.as_str());
        assert_eq!(name, Some("mcp-servers/everything"), "{file}");
        let tools = client.list_all_tools().await.unwrap();
        assert!(tools.iter().any(|t| t.name == "echo"), "{file}");
        let mut params = CallToolRequestParams::new("echo");
        params.arguments = json!({"message": file}).as_object().cloned();
        let answer = client.peer().call_tool_once(params).await.unwrap();
        let CallToolResponse::Complete(result) = answer else {
            panic!("{file}: not a complete result: {answer:?}");
        };
        let text = result.content[0].as_text().unwrap().text.clone();
        assert_eq!(text, format!("Echo: {file}"));
        let _ = client.cancel().await;
    }
}
