//! One connection to the server: the child process, the URL or the
//! in-process pipe, hooked to count the server's progress
//! ([`ProgressTally`]), and `initialize`.

use std::sync::Arc;

use rmcp::service::{RoleClient, RoleServer, RunningService};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess, Transport};
use rmcp::ServiceExt as _;

use super::http_client::{self, WatchedClient};
use super::{UpstreamHandler, UpstreamTarget};
use crate::config::UpstreamConfig;
use crate::progress::{ProgressRoutes, ProgressTally};
use crate::transport::HookedTransport;

pub(super) type Running = RunningService<RoleClient, UpstreamHandler>;

/// An open connection: the running service, the child's pid, and for a URL
/// the signal that the server lost the session ([`WatchedClient`]).
pub(super) struct Connected {
    pub(super) running: Running,
    pub(super) pid: Option<u32>,
    pub(super) lost: Option<Arc<tokio::sync::Notify>>,
}

/// Starts the child or opens the URL, and runs `initialize`. Progress the
/// server sends is counted into `progress` as it is read.
pub(super) async fn connect(
    target: &UpstreamTarget,
    config: &UpstreamConfig,
    handler: UpstreamHandler,
    progress: Arc<ProgressRoutes<RoleServer>>,
) -> Result<Connected, String> {
    let limit = config.connect_timeout;
    let connecting = async {
        match target {
            UpstreamTarget::Command { program, args } => {
                let mut command = tokio::process::Command::new(program);
                command.args(args);
                // stdin/stdout are the MCP pipe; stderr is the proxy's stderr,
                // so the server's logs land with ours (never on our stdout).
                let (transport, _) = TokioChildProcess::builder(command)
                    .spawn()
                    .map_err(|e| format!("cannot start {target}: {e}"))?;
                let pid = transport.id();
                let running = initialize(handler, transport, progress).await?;
                Ok(Connected {
                    running,
                    pid,
                    lost: None,
                })
            }
            UpstreamTarget::InProcess(server) => {
                let (read, write) = tokio::io::split((server.connect)());
                let transport = AsyncRwTransport::new_client(read, write);
                let running = initialize(handler, transport, progress).await?;
                Ok(Connected {
                    running,
                    pid: None,
                    lost: None,
                })
            }
            UpstreamTarget::Url(url) => {
                // Built per connection: a rotated token file is read again.
                let (client, _) = http_client::http_client(config, &http_client::process_var)
                    .map_err(|e| e.to_string())?;
                let (client, lost) = WatchedClient::new(client);
                let transport = StreamableHttpClientTransport::with_client(
                    client,
                    StreamableHttpClientTransportConfig::with_uri(url.as_str()),
                );
                let running = initialize(handler, transport, progress).await?;
                Ok(Connected {
                    running,
                    pid: None,
                    lost: Some(lost),
                })
            }
        }
    };
    match tokio::time::timeout(limit, connecting).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer to initialize within {}",
            humantime::format_duration(limit)
        )),
    }
}

/// Serves `handler` over `transport`, the server's progress counted into
/// `progress` as it is read, and runs `initialize`.
async fn initialize<T>(
    handler: UpstreamHandler,
    transport: T,
    progress: Arc<ProgressRoutes<RoleServer>>,
) -> Result<Running, String>
where
    T: Transport<RoleClient> + 'static,
{
    let hooked = HookedTransport::new(transport, ProgressTally::new(progress));
    handler.serve(hooked).await.map_err(initialize_failed)
}

/// Why `initialize` failed, with the transport's own cause (a TLS or
/// connect failure), which rmcp's error does not give as its source.
fn initialize_failed(error: rmcp::service::ClientInitializeError) -> String {
    match &error {
        rmcp::service::ClientInitializeError::TransportError { error, context } => {
            format!("initialize failed: {context}: {}", error_chain(error))
        }
        _ => format!("initialize failed: {}", error_chain(&error)),
    }
}

/// `error` and its sources, each once: reqwest's `Display` stops at
/// "error sending request", the TLS or connect failure is in its sources.
pub(super) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = cause(error);
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause(e);
    }
    text
}

/// The error's source, and for rmcp's HTTP client error the reqwest error it
/// holds (rmcp does not give it as the source: the TLS cause would be lost).
fn cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    use rmcp::transport::streamable_http_client::StreamableHttpError;
    if let Some(StreamableHttpError::Client(inner)) =
        error.downcast_ref::<StreamableHttpError<reqwest::Error>>()
    {
        return Some(inner);
    }
    error.source()
}
