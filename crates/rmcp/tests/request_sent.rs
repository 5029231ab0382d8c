//! `OnRequestSent`: the hook sees the request id and the progress token rmcp
//! put on the wire, which is what a proxy needs to route progress back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult, ClientRequest,
    ContentBlock, NumberOrString, ProgressToken, RequestId, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::{ErrorData, ServerHandler, ServiceExt};
use toolwarden_core::McpResponse;
use toolwarden_rmcp::{OnRequestSent, RmcpClient};
use tower::ServiceExt as _;

/// Answers every call with the progress token it received.
struct TokenEcho;

impl ServerHandler for TokenEcho {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let token = match context.meta.get_progress_token() {
            Some(ProgressToken(NumberOrString::Number(n))) => n.to_string(),
            Some(ProgressToken(NumberOrString::String(s))) => s.to_string(),
            None => "none".into(),
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(token)]).into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_sees_the_token_on_the_wire() {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        if let Ok(running) = TokenEcho.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let running = ().serve(client_io).await.expect("client connects");
    let client = RmcpClient::new(running.peer().clone());

    let seen: Arc<Mutex<Vec<(RequestId, ProgressToken)>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let mut params = CallToolRequestParams::new("any");
    params.arguments = Some(Default::default());
    let mut request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
    rmcp::model::GetExtensions::extensions_mut(&mut request).insert(OnRequestSent::new(
        move |id, token| sink.lock().unwrap().push((id.clone(), token.clone())),
    ));
    let result = client.clone().oneshot(request).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "the hook runs once per request");
    let ProgressToken(NumberOrString::Number(n)) = &seen[0].1 else {
        panic!("rmcp's tokens are numbers: {:?}", seen[0].1)
    };
    assert_eq!(result.first_text().as_deref(), Some(n.to_string().as_str()));

    // Without the hook nothing changes.
    let mut params = CallToolRequestParams::new("any");
    params.arguments = Some(Default::default());
    let plain = ClientRequest::CallToolRequest(CallToolRequest::new(params));
    assert!(client.oneshot(plain).await.is_ok());
}
