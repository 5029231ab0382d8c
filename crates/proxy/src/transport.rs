//! [`HookedTransport`]: the proxy's one wrapper of rmcp transports, on both
//! sides: any transport, with a hook ([`OnReceive`]) that sees each message
//! as it is read, before rmcp does. Sending and closing pass straight
//! through.
//!
//! The hooks the proxy uses:
//!
//! - `ProgressTally` (in [`crate::progress`]): counts the peer's
//!   progress as it is read, so its answers can wait for it (see
//!   [`crate::progress`]); on the upstream connection and on every
//!   downstream session;
//! - an HTTP session's mark (`InSession` in [`crate::downstream::http`]):
//!   tells the [`ProxyServer`](crate::downstream::ProxyServer) that a
//!   request came through a session's transport;
//! - a pair `(A, B)` runs `A`, then `B`.
//!
//! Public so that tests can hook their own servers' transports the same
//! way (recording what a server read, in order).

use std::borrow::Cow;
use std::fmt;
use std::future::Future;

use rmcp::service::{RxJsonRpcMessage, ServiceRole, TxJsonRpcMessage};
use rmcp::transport::Transport;

/// Sees each message a [`HookedTransport`] of role `R` reads, in the order
/// read and in the poll that hands it to rmcp (so a cancelled receive never
/// hooks a message rmcp did not get); it may change the message (its
/// extensions, typically).
pub trait OnReceive<R: ServiceRole>: Send {
    /// Called once per message read.
    fn on_receive(&self, message: &mut RxJsonRpcMessage<R>);
}

impl<R: ServiceRole, A: OnReceive<R>, B: OnReceive<R>> OnReceive<R> for (A, B) {
    fn on_receive(&self, message: &mut RxJsonRpcMessage<R>) {
        self.0.on_receive(message);
        self.1.on_receive(message);
    }
}

/// A transport `T` whose every message read goes through `hook` first (see
/// the [module docs](self)).
pub struct HookedTransport<T, H> {
    inner: T,
    hook: H,
}

impl<T, H> HookedTransport<T, H> {
    /// `inner`, each message it reads shown to `hook`.
    pub fn new(inner: T, hook: H) -> Self {
        HookedTransport { inner, hook }
    }
}

impl<T, H: fmt::Debug> fmt::Debug for HookedTransport<T, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedTransport")
            .field("hook", &self.hook)
            .finish_non_exhaustive()
    }
}

impl<R, T, H> Transport<R> for HookedTransport<T, H>
where
    R: ServiceRole,
    T: Transport<R>,
    H: OnReceive<R> + Sync,
{
    type Error = T::Error;

    fn name() -> Cow<'static, str> {
        T::name()
    }

    fn send(
        &mut self,
        item: TxJsonRpcMessage<R>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<R>> {
        let mut message = self.inner.receive().await?;
        self.hook.on_receive(&mut message);
        Some(message)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}
