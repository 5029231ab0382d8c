//! [`SharedFailure`]: the failure of a shared call, as each caller gets it.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use toolwarden_core::classify::{CallTimedOut, TransportError};
use toolwarden_core::jsonrpc::ErrorObject;
use toolwarden_core::{
    BoxError, BulkheadFull, CircuitOpen, LoopDetected, RateLimited, RetryBudgetExhausted,
};

/// The failure of a call that several identical calls shared, as a caller
/// gets it when the failure could not be copied as its own type: its
/// message is the failure's, and its [`source`](StdError::source) is the
/// failure itself, so the classifier and the renderer, which read the
/// source chain, see what it was.
///
/// The failures of toolwarden's own types (every rejection, a JSON-RPC
/// [`ErrorObject`], a [`TransportError`], a [`CallTimedOut`]) are copied
/// instead: each caller gets one of the same type, to downcast as usual.
#[derive(Clone)]
pub struct SharedFailure {
    error: Arc<BoxError>,
}

impl SharedFailure {
    pub(crate) fn new(error: BoxError) -> Self {
        SharedFailure {
            error: Arc::new(error),
        }
    }

    /// The failure of the shared call.
    #[must_use]
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &**self.error
    }

    /// The failure as one caller's error: a copy of the same type where the
    /// type is one of toolwarden's own, else this wrapper.
    pub(crate) fn to_error(&self) -> BoxError {
        let e: &(dyn StdError + 'static) = &**self.error;
        macro_rules! copy {
            ($($ty:ty),*) => {$(
                if let Some(e) = e.downcast_ref::<$ty>() {
                    return Box::new(e.clone());
                }
            )*};
        }
        copy!(
            ErrorObject,
            TransportError,
            CallTimedOut,
            CircuitOpen,
            RateLimited,
            BulkheadFull,
            LoopDetected,
            RetryBudgetExhausted
        );
        Box::new(self.clone())
    }
}

impl fmt::Debug for SharedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedFailure").field(&self.error).finish()
    }
}

impl fmt::Display for SharedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl StdError for SharedFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&**self.error)
    }
}

/// The source of the [`SharedFailure`] that the callers waiting for a
/// shared call get when polling that call panicked (in another caller's
/// poll, to which the panic unwinds): the call is over, without an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedCallPanicked;

impl fmt::Display for SharedCallPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the shared call panicked while another caller polled it")
    }
}

impl StdError for SharedCallPanicked {}
