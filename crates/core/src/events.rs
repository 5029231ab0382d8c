//! The event hook through which layers report resilience events.
//!
//! Layers emit [`Event`]s into an [`Events`] handle they were configured with;
//! observability and the Redis sync subscribe by adding an [`EventSink`].
//! Events borrow their data, so emitting one allocates nothing; with no sink
//! installed, emitting is a branch on an empty slice.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use toolwarden_core::events::{Event, Events};
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = Arc::clone(&seen);
//! let events = Events::new().with(move |e: &Event<'_>| sink.lock().unwrap().push(e.name()));
//! events.emit(&Event::CircuitOpened { key: "search", retry_after: std::time::Duration::from_secs(5) });
//! assert_eq!(*seen.lock().unwrap(), ["circuit_opened"]);
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// One resilience event: a fact, named in the past tense, about the call or
/// key in `key` (the tool name with the default key function; the breaker or
/// limiter key, the method for calls that name no tool).
///
/// An event that reports a refusal is named like the [`Rejection`] the
/// caller receives: [`CircuitOpened`](Event::CircuitOpened) for
/// [`CircuitOpen`](crate::CircuitOpen), [`RateLimited`](Event::RateLimited),
/// [`RetryBudgetExhausted`](Event::RetryBudgetExhausted),
/// [`LoopDetected`](Event::LoopDetected) and
/// [`BulkheadFull`](Event::BulkheadFull).
///
/// [`Rejection`]: crate::Rejection
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A circuit opened (or reopened from half-open).
    CircuitOpened {
        /// The breaker key.
        key: &'a str,
        /// How long it stays open before a probe.
        retry_after: Duration,
    },
    /// A circuit half-opened: it let its first probe through.
    CircuitHalfOpened {
        /// The breaker key.
        key: &'a str,
    },
    /// A circuit closed.
    CircuitClosed {
        /// The breaker key.
        key: &'a str,
    },
    /// A call was refused (or delayed past `max_wait`) by a rate limit.
    RateLimited {
        /// The limiter key.
        key: &'a str,
        /// When a token is available.
        retry_after: Duration,
    },
    /// A failed call was retried.
    Retried {
        /// The tool or method.
        key: &'a str,
        /// The attempt about to be made (2 for the first retry).
        attempt: u32,
        /// The backoff before it.
        delay: Duration,
    },
    /// A retry was refused because the retry budget is spent.
    RetryBudgetExhausted {
        /// The tool or method.
        key: &'a str,
    },
    /// A call repeated often enough to be close to blocking.
    LoopWarned {
        /// The tool.
        key: &'a str,
        /// Repeats seen so far.
        repeats: u32,
    },
    /// A repeated call was detected and refused.
    LoopDetected {
        /// The tool.
        key: &'a str,
        /// Repeats seen, this one included.
        repeats: u32,
    },
    /// A stale cached result was served for a failed call.
    StaleServed {
        /// The tool.
        key: &'a str,
        /// The age of the result served.
        age: Duration,
    },
    /// A failed call was answered with a structured error result.
    Degraded {
        /// The tool.
        key: &'a str,
    },
    /// A call was refused (or waited past `max_wait`) because every place
    /// of its key's bulkhead was taken.
    BulkheadFull {
        /// The bulkhead key.
        key: &'a str,
        /// The cap that was reached.
        max_concurrent: u32,
        /// When a place is expected to come free.
        retry_after: Duration,
    },
    /// An adaptive bulkhead's cap moved: grown by fast successes while in
    /// use, or cut by slow calls and server failures.
    BulkheadLimitChanged {
        /// The bulkhead key.
        key: &'a str,
        /// The cap before.
        from: u32,
        /// The cap now.
        to: u32,
    },
    /// A call joined an identical call already in flight and shares its
    /// answer instead of reaching the tool itself.
    Coalesced {
        /// The tool.
        key: &'a str,
    },
    /// A second copy of a slow call was sent (a hedge): the first good
    /// answer of the two is returned, the other attempt cancelled.
    Hedged {
        /// The tool.
        key: &'a str,
        /// How long the first attempt had run when the hedge was sent.
        delay: Duration,
    },
    /// Shared state could not be synchronised with another replica.
    SyncFailed {
        /// What failed.
        detail: &'a str,
    },
}

impl Event<'_> {
    /// The event's name, used as the `event` metric label: the variant in
    /// snake case (`circuit_opened`, `circuit_half_opened`, `circuit_closed`,
    /// `rate_limited`, `retried`, `retry_budget_exhausted`, `loop_warned`,
    /// `loop_detected`, `stale_served`, `degraded`, `bulkhead_full`,
    /// `bulkhead_limit_changed`, `coalesced`, `hedged`, `sync_failed`).
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Event::CircuitOpened { .. } => "circuit_opened",
            Event::CircuitHalfOpened { .. } => "circuit_half_opened",
            Event::CircuitClosed { .. } => "circuit_closed",
            Event::RateLimited { .. } => "rate_limited",
            Event::Retried { .. } => "retried",
            Event::RetryBudgetExhausted { .. } => "retry_budget_exhausted",
            Event::LoopWarned { .. } => "loop_warned",
            Event::LoopDetected { .. } => "loop_detected",
            Event::StaleServed { .. } => "stale_served",
            Event::Degraded { .. } => "degraded",
            Event::BulkheadFull { .. } => "bulkhead_full",
            Event::BulkheadLimitChanged { .. } => "bulkhead_limit_changed",
            Event::Coalesced { .. } => "coalesced",
            Event::Hedged { .. } => "hedged",
            Event::SyncFailed { .. } => "sync_failed",
        }
    }

    /// The tool or key the event is about (its `key`), if any.
    #[must_use]
    pub fn subject(&self) -> Option<&str> {
        match self {
            Event::CircuitOpened { key, .. }
            | Event::CircuitHalfOpened { key }
            | Event::CircuitClosed { key }
            | Event::RateLimited { key, .. }
            | Event::Retried { key, .. }
            | Event::RetryBudgetExhausted { key }
            | Event::LoopWarned { key, .. }
            | Event::LoopDetected { key, .. }
            | Event::StaleServed { key, .. }
            | Event::Degraded { key }
            | Event::BulkheadFull { key, .. }
            | Event::BulkheadLimitChanged { key, .. }
            | Event::Coalesced { key }
            | Event::Hedged { key, .. } => Some(key),
            Event::SyncFailed { .. } => None,
        }
    }
}

/// Receives events. Implemented for closures `Fn(&Event<'_>)`.
pub trait EventSink: Send + Sync + 'static {
    /// Called synchronously on the call path: keep it cheap.
    fn on_event(&self, event: &Event<'_>);
}

impl<F> EventSink for F
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event<'_>) {
        self(event)
    }
}

/// A cloneable set of sinks that layers emit into. Empty by default.
#[derive(Clone, Default)]
pub struct Events {
    sinks: Arc<[Arc<dyn EventSink>]>,
}

impl Events {
    /// No sinks.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sink.
    #[must_use]
    pub fn with(self, sink: impl EventSink) -> Self {
        self.with_arc(Arc::new(sink))
    }

    /// Adds a shared sink.
    #[must_use]
    pub fn with_arc(self, sink: Arc<dyn EventSink>) -> Self {
        let mut sinks: Vec<_> = self.sinks.iter().cloned().collect();
        sinks.push(sink);
        Events {
            sinks: sinks.into(),
        }
    }

    /// Merges two sets of sinks.
    #[must_use]
    pub fn merge(&self, other: &Events) -> Self {
        let sinks: Vec<_> = self
            .sinks
            .iter()
            .chain(other.sinks.iter())
            .cloned()
            .collect();
        Events {
            sinks: sinks.into(),
        }
    }

    /// Whether any sink is installed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Delivers `event` to every sink.
    #[inline]
    pub fn emit(&self, event: &Event<'_>) {
        for sink in self.sinks.iter() {
            sink.on_event(event);
        }
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}
