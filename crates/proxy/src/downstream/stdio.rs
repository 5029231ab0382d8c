//! The downstream side over stdio: newline-delimited JSON-RPC on stdin and
//! stdout.
//!
//! - One reader task reads stdin through the [`framer`](super::framer):
//!   valid messages go to rmcp, malformed lines are answered at once
//!   (`-32700`, `-32600`, `-32602`, with the request id when it can be read).
//! - One writer task owns stdout: rmcp's messages and the framer's answers
//!   are queued to it as whole lines, so lines never interleave and stdout
//!   carries nothing but JSON-RPC. Logs go to stderr.
//! - The rmcp session is served over a [`Transport`] on those two queues. If
//!   a session fails to start (the first message was not `initialize`, or
//!   the upstream could not be reached and `initialize` was answered with an
//!   error), a new one is started on the same streams, so the client can
//!   simply send `initialize` again.
//! - That transport counts the client's `notifications/progress` as it reads
//!   them, so progress on a request of the server's reaches the server in
//!   order and before the client's answer (see [`crate::progress`]).
//! - At the end of stdin rmcp answers the requests still in flight (for up
//!   to 5 s), the writer flushes, and [`serve_stdio`] returns; cancelling
//!   `shutdown` (SIGTERM, SIGINT) does the same with rmcp's 2 s drain.
//!   A request rmcp did not answer within its drain (or never received) is
//!   answered by the proxy before it returns: `-32000`, "the proxy stopped
//!   before the request was answered". The reader notes each request's id
//!   before rmcp sees it, the transport strikes it off as rmcp answers (and
//!   a client's `notifications/cancelled` strikes it off too), at most
//!   4 096 (`TRACKED`) ids at once: every request gets exactly one answer.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::sync::Arc;

use rmcp::model::{
    ClientJsonRpcMessage, ClientNotification, ErrorCode, ErrorData, JsonRpcError, RequestId,
    ServerJsonRpcMessage,
};
use rmcp::service::{RoleServer, ServerInitializeError, ServiceExt};
use rmcp::transport::Transport;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::framer::{classify_line, too_long_reply, Frame, LineReader, RawLine};
use super::{ProxyCore, ProxyServer};
use crate::progress::ProgressTally;
use crate::transport::HookedTransport;

/// Messages queued for rmcp and lines queued for stdout.
const QUEUE: usize = 256;

/// The most request ids [`Unanswered`] keeps: a client with more requests
/// than this in flight when the session ends may miss the answers of the
/// ones past it.
const TRACKED: usize = 4096;

/// The ids of the client's requests not answered yet (see the module
/// docs).
#[derive(Clone, Default)]
struct Unanswered(Arc<std::sync::Mutex<HashSet<RequestId>>>);

impl Unanswered {
    fn ids(&self) -> std::sync::MutexGuard<'_, HashSet<RequestId>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes a request read, or strikes off the one a cancellation names.
    /// `Err` with the answer for a request whose id is in flight already:
    /// rmcp would answer only one of the two.
    fn read(&self, message: &ClientJsonRpcMessage) -> Result<(), String> {
        match message {
            ClientJsonRpcMessage::Request(request) => {
                let mut ids = self.ids();
                if ids.contains(&request.id) {
                    let error = ErrorData::new(
                        ErrorCode::INVALID_REQUEST,
                        "Invalid Request: a request with this id is in flight; use another id",
                        None,
                    );
                    let answer = ServerJsonRpcMessage::error(error, Some(request.id.clone()));
                    return Err(serde_json::to_string(&answer).unwrap_or_default());
                }
                if ids.len() < TRACKED {
                    ids.insert(request.id.clone());
                }
            }
            ClientJsonRpcMessage::Notification(notification) => {
                if let ClientNotification::CancelledNotification(cancelled) =
                    &notification.notification
                {
                    if let Some(id) = &cancelled.params.request_id {
                        self.ids().remove(id);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Strikes off the request `message` answers.
    fn sent(&self, message: &ServerJsonRpcMessage) {
        let id = match message {
            ServerJsonRpcMessage::Response(response) => &response.id,
            ServerJsonRpcMessage::Error(JsonRpcError { id: Some(id), .. }) => id,
            _ => return,
        };
        self.ids().remove(id);
    }

    /// The answers to the requests still unanswered, each once.
    fn answers(&self) -> Vec<String> {
        let error = ErrorData::new(
            ErrorCode(-32000),
            "the proxy stopped before the request was answered (end of input or shutdown); \
             it may have reached the server",
            None,
        );
        self.ids()
            .drain()
            .filter_map(|id| {
                serde_json::to_string(&ServerJsonRpcMessage::error(error.clone(), Some(id))).ok()
            })
            .collect()
    }
}

/// An rmcp transport over the reader's and writer's queues.
struct QueueTransport {
    incoming: Arc<Mutex<mpsc::Receiver<ClientJsonRpcMessage>>>,
    outgoing: mpsc::Sender<String>,
    unanswered: Unanswered,
}

impl Transport<RoleServer> for QueueTransport {
    type Error = io::Error;

    fn send(
        &mut self,
        item: ServerJsonRpcMessage,
    ) -> impl Future<Output = Result<(), io::Error>> + Send + 'static {
        let outgoing = self.outgoing.clone();
        let unanswered = self.unanswered.clone();
        async move {
            let line = serde_json::to_string(&item).map_err(io::Error::other)?;
            unanswered.sent(&item);
            outgoing
                .send(line)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "stdout is closed"))
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<ClientJsonRpcMessage>> + Send {
        let incoming = Arc::clone(&self.incoming);
        async move { incoming.lock().await.recv().await }
    }

    async fn close(&mut self) -> Result<(), io::Error> {
        Ok(())
    }
}

/// Reads lines, hands valid messages to rmcp and answers malformed ones
/// (and a request whose id is in flight already).
async fn read_input<R: AsyncRead + Unpin>(
    mut lines: LineReader<BufReader<R>>,
    to_rmcp: mpsc::Sender<ClientJsonRpcMessage>,
    replies: mpsc::Sender<String>,
    unanswered: Unanswered,
) {
    loop {
        let reply = match lines.next_line().await {
            Ok(Some(RawLine::Line(line))) => match classify_line(&line) {
                // Noted before rmcp can answer it.
                Frame::Message(message) => match unanswered.read(&message) {
                    Ok(()) => {
                        if to_rmcp.send(*message).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(reply) => reply,
                },
                Frame::Reply(reply) => reply,
                Frame::Ignore(why) => {
                    tracing::debug!(why, "ignored an input line");
                    continue;
                }
            },
            Ok(Some(RawLine::TooLong { prefix })) => {
                too_long_reply(&prefix, lines.max_line_bytes())
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed; treating it as closed");
                return;
            }
        };
        metrics::counter!("toolwarden_proxy_malformed_messages_total").increment(1);
        tracing::debug!(reply = %reply, "answered a malformed message");
        if replies.send(reply).await.is_err() {
            return;
        }
    }
}

/// Writes queued lines; flushes whenever the queue is momentarily empty.
async fn write_output<W: AsyncWrite + Unpin>(
    mut output: W,
    mut lines: mpsc::Receiver<String>,
) -> io::Result<()> {
    let mut buffer = Vec::new();
    while let Some(line) = lines.recv().await {
        buffer.clear();
        buffer.extend_from_slice(line.as_bytes());
        buffer.push(b'\n');
        while let Ok(line) = lines.try_recv() {
            buffer.extend_from_slice(line.as_bytes());
            buffer.push(b'\n');
        }
        output.write_all(&buffer).await?;
        output.flush().await?;
    }
    output.flush().await
}

/// Serves downstream clients on `input`/`output` (stdin/stdout in the
/// binary; any byte streams in tests) until the input ends or `shutdown`
/// is cancelled. See the [module docs](self).
pub async fn serve_stdio<R, W>(
    core: Arc<ProxyCore>,
    input: R,
    output: W,
    max_line_bytes: usize,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (line_tx, line_rx) = mpsc::channel::<String>(QUEUE);
    let writer = tokio::spawn(write_output(output, line_rx));
    let (message_tx, message_rx) = mpsc::channel::<ClientJsonRpcMessage>(QUEUE);
    let unanswered = Unanswered::default();
    let reader = tokio::spawn(read_input(
        LineReader::new(BufReader::new(input), max_line_bytes),
        message_tx,
        line_tx.clone(),
        unanswered.clone(),
    ));
    let incoming = Arc::new(Mutex::new(message_rx));
    loop {
        let server = ProxyServer::new(Arc::clone(&core));
        let transport = HookedTransport::new(
            QueueTransport {
                incoming: Arc::clone(&incoming),
                outgoing: line_tx.clone(),
                unanswered: unanswered.clone(),
            },
            ProgressTally::new(server.progress_routes()),
        );
        match server
            .serve_with_ct(transport, shutdown.child_token())
            .await
        {
            Ok(running) => {
                // Ends at the end of input or on shutdown; rmcp bounds its drain.
                if let Err(e) = running.waiting().await {
                    tracing::warn!(error = %e, "the session task failed");
                }
                break;
            }
            Err(
                ServerInitializeError::ConnectionClosed(_)
                | ServerInitializeError::Cancelled
                | ServerInitializeError::TransportError { .. },
            ) => break,
            Err(e) => {
                tracing::warn!(error = %e, "the client session did not start; waiting for a new initialize");
            }
        }
    }
    // On shutdown the reader may be blocked on stdin: stop it.
    reader.abort();
    let _ = reader.await;
    // rmcp's session has ended: nothing else will answer these.
    for answer in unanswered.answers() {
        if line_tx.send(answer).await.is_err() {
            break;
        }
    }
    drop(line_tx);
    drop(incoming);
    match tokio::time::timeout(std::time::Duration::from_secs(5), writer).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(io::Error::other(e)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "stdout did not drain within 5 s",
        )),
    }
}
